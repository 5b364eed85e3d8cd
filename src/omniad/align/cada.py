"""CADA (Class-Agnostic Distribution Alignment, ECCV 2024) as a detector that wraps any registered base detector.

After the base is trained on the normal images of every type (mixed, no labels), each training image's anomaly
map gives targets u = mean and gamma = max (or u + 3 sigma); a small regressor learns to predict (u, gamma) from
frozen backbone features of the image. At test time every map is aligned by ``(map - u_hat) / (gamma_hat -
u_hat)``, which puts the normal scores of every (implicit) type on one scale, and the image score is the mean of
the top 1% of the aligned map. Neither fit nor score can receive a type label: CADA honours the Detector protocol.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omniad.align.core import (
    DEFAULT_ITERATIONS,
    PAPER_ALPHA,
    PAPER_ITERATIONS,
    SHARED_COMMON,
    AlignmentData,
    FeatureReader,
    build_base,
    collect_alignment_data,
    jsonable_params,
    make_feature_reader,
    train_head,
)
from omniad.align.regressor import CADARegressor, channel_statistics
from omniad.align.stats import _check_target, align_with_spread, targets_from_moments
from omniad.backbone import Backbone
from omniad.data.sources import as_image_dataset, iterate_batches
from omniad.methods.base import BaseDetector, NotFittedError
from omniad.postprocess import image_score
from omniad.registry import register_detector
from omniad.runtime import resolve_device
from omniad.types import AnomalyScores


@register_detector("cada")
class CADA(BaseDetector):
    """Class-agnostic distribution alignment over a base detector: one threshold for every type, no labels.

    ``create_detector("cada", base="revdist", base_params={"preset": "cpu"})``. ``fit(data)`` holds out
    ``calibration_fraction`` of the images first, fits the base on the rest (the base itself holds nothing out),
    computes the alignment targets from the base's maps of exactly those training images, trains the regressor,
    then calibrates one threshold on the ALIGNED scores of the held-out normals (and the base's own threshold on
    its raw scores of the same images, ``base_.threshold_``, for comparison).

    An already fitted base can be passed as ``base=<detector instance>``: CADA then only trains the regressor.
    Give ``fit`` the images that base was trained on (the targets must come from training maps), and note that
    the held-out share is then made of images the base has seen; set ``calibration_fraction=0`` and call
    ``calibrate(unseen_normals)`` for an honest threshold.

    Args:
        base: registered name of the base detector (paper: "revdist", "recontrast", "uniad"), or a fitted
            detector instance.
        base_params: hyper-parameters of the base (e.g. {"preset": "cpu"}); the shared settings (backbone,
            weights, image_size, device, seed, batch_size, progress) default to CADA's own.
        target: "max": regress (u, gamma = max of the map), the paper's default; "u_sigma": gamma = u + 3 sigma
            of the map (Table 5; more robust when the training images contain a few defects).
        feature_stage: backbone stage (timm feature index) the regressor reads; None = the deepest stage of the
            base's frozen backbone, or stage 3 of CADA's own backbone when the base exposes none.
        feature_size: larger feature maps are average-pooled to this size before the regressor (8: the 8 x 8
            grid of the paper's WideResNet bottleneck at 256 px; also 4x less work per SGD step than lite0's
            16 x 16 stage 3); None keeps the stage's own size.
        hidden: hidden width of the regressor's two linear layers (paper: 256).
        dropout: dropout before each linear layer (paper: 0.25).
        alpha: smooth-L1 threshold in the units of the base's scores (paper: 0.1 for revdist/recontrast, 10 for
            uniad); None = the paper's value for those bases, else one standard deviation of the targets.
        iterations: SGD iterations of the regressor; None = the paper's (5,000; 20,000 for uniad). A CPU
            setting: 300 (the regressor then trains in tens of seconds on a 2-core CPU).
        train_batch_size: regressor mini-batch size (paper: 16).
        lr: SGD learning rate (paper: 5e-2).
        momentum: SGD momentum (paper: 0.9).
        weight_decay: SGD weight decay (paper: 1e-4).
        image_pooling: image score from the aligned map: "top1" (mean of the top ``top_fraction``, the paper's),
            "max" or "maxpool".
        top_fraction: share of the highest aligned pixel scores averaged into the image score (paper: 0.01).
        **common: see ``BaseDetector``.
    """

    # settings small enough for the contract test on the tiny synthetic set (seconds on a 2-core CPU)
    test_params: dict[str, Any] = {"base": "padim", "iterations": 50}  # padim: the quickest base

    wraps_base = True

    def __init__(
        self,
        *,
        base: str | BaseDetector = "revdist",
        base_params: dict[str, Any] | None = None,
        target: str = "max",
        feature_stage: int | None = None,
        feature_size: int | None = 8,
        hidden: int = 256,
        dropout: float = 0.25,
        alpha: float | None = None,
        iterations: int | None = None,
        train_batch_size: int = 16,
        lr: float = 5e-2,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        image_pooling: str = "top1",
        top_fraction: float = 0.01,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        self._base_instance: BaseDetector | None = None
        if isinstance(base, BaseDetector):
            if base_params:
                raise ValueError("base_params cannot be combined with a base detector instance")
            self._base_instance = base
            self.base = base.name
            self.base_params = jsonable_params(base.get_params())
        elif isinstance(base, str):
            self.base = base
            self.base_params = jsonable_params(base_params)
        else:
            raise TypeError(f"base must be a registered detector name or a detector, got {type(base).__name__}")
        _check_target(target)
        if iterations is not None and iterations < 1:
            raise ValueError(f"iterations must be positive, got {iterations}")
        self.target = target
        self.feature_stage = feature_stage
        self.feature_size = feature_size
        self.hidden = hidden
        self.dropout = dropout
        self.alpha = alpha
        self.iterations = iterations
        self.train_batch_size = train_batch_size
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.image_pooling = image_pooling
        self.top_fraction = top_fraction

    # ----------------------------------------------------------------- settings resolved per base
    def resolved_alpha(self) -> float | None:
        """The smooth-L1 threshold used (None: one standard deviation of the targets)."""
        return self.alpha if self.alpha is not None else PAPER_ALPHA.get(self.base)

    def resolved_iterations(self) -> int:
        """The regressor's SGD iterations used."""
        return self.iterations if self.iterations is not None else PAPER_ITERATIONS.get(self.base, DEFAULT_ITERATIONS)

    def _shared_common(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in SHARED_COMMON}

    def _own_backbone(self, stage: int) -> Backbone:
        self.feature_backbone_ = Backbone(self.backbone, (stage,), "random" if self._loading else self.weights)
        return self.feature_backbone_.to(self.device_)

    def _attach_base(self, base: BaseDetector) -> None:
        self.base_ = base
        self.feature_backbone_ = None
        self.reader_: FeatureReader = make_feature_reader(
            base, self.feature_stage, self._own_backbone, size=self.feature_size
        )

    # ----------------------------------------------------------------- fitting
    def collect(self, images: Any) -> AlignmentData:
        """Fit the base on ``images`` (unless it came fitted) and collect the alignment data from its maps of them.

        ``fit`` does this on the non-held-out images; call it directly to share one collection between
        several alignment heads (e.g. ``target="max"`` and ``"u_sigma"`` over one base).
        """
        if not hasattr(self, "device_"):
            self.device_ = resolve_device(self.device)
        images = as_image_dataset(images)
        base = self._base_instance
        if base is None:
            base = build_base(self.base, self.base_params, self._shared_common())
        if not getattr(base, "fitted_", False):
            base.calibration_fraction = 0.0  # trained on all of these, so targets = the base's training maps
            base.fit(images)
        self._attach_base(base)
        return collect_alignment_data(base, self.reader_, images, self.batch_size, self.progress)

    def _fit(self, images) -> None:
        self.fit_alignment(self.collect(images))

    def fit_alignment(self, data: AlignmentData) -> CADA:
        """Train the regressor on alignment data collected from the base's training maps (see ``collect``)."""
        if not hasattr(self, "base_"):
            if self._base_instance is None or not getattr(self._base_instance, "fitted_", False):
                raise NotFittedError("fit_alignment needs a fitted base: call collect(images) or fit(images) first")
            self.device_ = resolve_device(self.device)
            self._attach_base(self._base_instance)
        if data.stage != self.reader_.stage or data.features.shape[1] != self.reader_.channels:
            raise ValueError(
                f"the alignment data holds stage {data.stage} features ({data.features.shape[1]} channels) but this "
                f"CADA reads stage {self.reader_.stage} ({self.reader_.channels} channels)"
            )
        targets = targets_from_moments(data.moments, self.target)  # (u, gamma) per training image
        u, gamma = targets[:, 0], targets[:, 1]
        # The head predicts (u, spread = gamma - u): the same function class as predicting (u, gamma) (the last
        # layer is linear) and the same loss on (u_hat, gamma_hat = u_hat + spread_hat), but the spread the map
        # is divided by is then not a difference of two nearly equal numbers (1 ulp of u would move it).
        head_targets = torch.stack([u, gamma - u], 1)
        t_mean = head_targets.mean(0)
        t_scale = _scale(head_targets)
        u_scale, g_scale = float(t_scale[0]), float(_scale(gamma[:, None])[0])
        f_mean, f_scale = channel_statistics(data.features)
        self.regressor_ = CADARegressor(data.features.shape[1], 2, self.hidden, self.dropout)
        self.regressor_.set_normalisation(f_mean, f_scale, t_mean, t_scale)
        alpha = self.resolved_alpha()
        # Eq. 3, smooth-L1 on u plus smooth-L1 on gamma, each divided by its target's standard deviation (alpha
        # alike): the paper's loss per target up to a constant factor, so the same minimiser, but one SGD
        # learning rate suits bases whose scores differ by orders of magnitude. alpha None: beta = 1 std.
        beta_u = alpha / u_scale if alpha is not None else 1.0
        beta_g = alpha / g_scale if alpha is not None else 1.0
        mean, scale = t_mean.to(self.device_), t_scale.to(self.device_)

        def loss_fn(pred: Tensor, target: Tensor) -> Tensor:
            out = pred * scale + mean
            u_hat, g_hat = out[:, 0], out[:, 0] + out[:, 1]
            return F.smooth_l1_loss(u_hat / u_scale, target[:, 0] / u_scale, beta=beta_u) + F.smooth_l1_loss(
                g_hat / g_scale, target[:, 1] / g_scale, beta=beta_g
            )

        self.loss_history_ = train_head(
            self.regressor_, data.features, targets, loss_fn,
            iterations=self.resolved_iterations(), batch_size=self.train_batch_size, lr=self.lr,
            momentum=self.momentum, weight_decay=self.weight_decay, seed=self.seed, device=self.device_,
            progress=self.progress, desc="CADA regressor",
        )
        # A regressor far outside its training data may predict gamma <= u; clamp the spread to half the
        # smallest spread seen in training rather than flip or explode the map.
        self.min_spread_ = max(0.5 * float((gamma - u).min()), 1e-12)
        self.fitted_ = True
        self.threshold_ = float("nan")
        return self

    # ----------------------------------------------------------------- scoring
    def predict_statistics(self, features: Tensor) -> Tensor:
        """(B, 2) predicted (u_hat, gamma_hat) for frozen features of the regressor's stage."""
        out = self._predict(features)
        return torch.stack([out[:, 0], out[:, 0] + out[:, 1]], 1)

    def _predict(self, features: Tensor) -> Tensor:
        """(B, 2) predicted (u_hat, gamma_hat - u_hat)."""
        self._check_fitted()
        with torch.no_grad():
            return self.regressor_(features.to(self.device_).float())

    def align(self, maps: Tensor, features: Tensor) -> AnomalyScores:
        """Align base maps with the statistics predicted from the images' features; pool the image scores."""
        out = self._predict(features).to(maps.device)
        aligned = align_with_spread(maps.float(), out[:, 0], out[:, 1], self.min_spread_)
        return AnomalyScores(image_score(aligned, self.image_pooling, fraction=self.top_fraction), aligned)

    def base_and_features(self, images: Tensor) -> tuple[AnomalyScores, Tensor]:
        """The base's own scores of a batch (on the base's device) and the regressor's frozen features."""
        self._check_fitted()
        return self.reader_.base_and_features(self.base_, images.to(self.base_.device_))

    def _score(self, images: Tensor) -> AnomalyScores:
        raw, features = self.base_and_features(images)
        return self.align(raw.anomaly_maps.to(self.device_), features)

    @torch.no_grad()
    def score_with_base(self, data: Any) -> tuple[AnomalyScores, AnomalyScores]:
        """Scores of every image before (the base's) and after alignment, in one pass (on the CPU)."""
        self._check_fitted()
        raw_s, raw_m, out_s, out_m = [], [], [], []
        for batch in iterate_batches(data, self.batch_size, self.progress, "scoring"):
            raw, features = self.base_and_features(batch)
            aligned = self.align(raw.anomaly_maps.to(self.device_), features)
            raw_s.append(raw.image_scores.float().cpu())
            raw_m.append(raw.anomaly_maps.float().cpu())
            out_s.append(aligned.image_scores.float().cpu())
            out_m.append(aligned.anomaly_maps.float().cpu())
        if not raw_s:
            empty = AnomalyScores(torch.empty(0), torch.empty(0, self.image_size, self.image_size))
            return empty, empty
        return (
            AnomalyScores(torch.cat(raw_s), torch.cat(raw_m)),
            AnomalyScores(torch.cat(out_s), torch.cat(out_m)),
        )

    def calibrate(self, normal_images: Any, target_far: float | None = None) -> float:
        """One threshold on the ALIGNED scores of these normal images (``threshold_``), and the base's threshold
        on its raw scores of the same images (``base_.threshold_``), in one pass."""
        from omniad.calibration import threshold_at_far

        far = self.target_far if target_far is None else target_far
        raw, aligned = self.score_with_base(as_image_dataset(normal_images))
        self.base_.calibration_scores_ = raw.image_scores
        self.base_.threshold_ = threshold_at_far(raw.image_scores.numpy(), far)
        self.calibration_scores_ = aligned.image_scores
        self.threshold_ = threshold_at_far(aligned.image_scores.numpy(), far)
        return self.threshold_

    # ----------------------------------------------------------------- persistence
    def _modules(self) -> dict[str, nn.Module]:
        modules = {f"base.{name}": module for name, module in self.base_._modules().items()}
        modules["regressor"] = self.regressor_
        if not self.reader_.shared:
            modules["features"] = self.feature_backbone_
        return modules

    def _meta(self) -> dict[str, Any]:
        return {
            "base_meta": self.base_.fitted_meta(),
            "feature_stage": self.reader_.stage,
            "feature_shared": self.reader_.shared,
            "feature_channels": self.reader_.channels,
            "min_spread": self.min_spread_,
        }

    def load_state(self, meta: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        """Rebuild the base from its own part of the bundle, then the regressor (and own backbone)."""
        self.device_ = resolve_device(self.device)
        base = build_base(self.base, self.base_params, self._shared_common())
        base.device, base.progress = self.device, self.progress
        base_meta = dict(meta["base_meta"])
        base.load_state(base_meta, {k[len("base.") :]: v for k, v in tensors.items() if k.startswith("base.")})
        threshold = base_meta.get("threshold")
        base.threshold_ = float("nan") if threshold is None else float(threshold)
        self._pending_base = base
        super().load_state(meta, tensors)

    def _build(self, meta: dict[str, Any]) -> None:
        base = getattr(self, "_pending_base", None)
        if base is None:
            raise NotFittedError("CADA is rebuilt through load_state (omniad.load_detector), not _build alone")
        del self._pending_base
        self._attach_base(base)
        if self.reader_.shared != meta["feature_shared"] or self.reader_.stage != meta["feature_stage"]:
            raise RuntimeError(
                f"the rebuilt base gives features of stage {self.reader_.stage} (shared={self.reader_.shared}); "
                f"the bundle was saved with stage {meta['feature_stage']} (shared={meta['feature_shared']})"
            )
        self.regressor_ = CADARegressor(int(meta["feature_channels"]), 2, self.hidden, self.dropout)
        self.min_spread_ = float(meta["min_spread"])
        self.threshold_ = float("nan")
        if not math.isfinite(self.min_spread_):
            raise RuntimeError("the bundle's min_spread is not a finite number")


def _scale(values: Tensor) -> Tensor:
    """Per-column standard deviation, floored so that constant targets do not divide by zero."""
    return values.std(0, unbiased=False).clamp_min(1e-6 * (1.0 + float(values.abs().max())))
