"""CADA (Class-Agnostic Distribution Alignment, ECCV 2024) as a detector that wraps any registered base detector.

After the base is trained on the normal images of every type (mixed, no labels), each training image's anomaly
map gives targets u = mean and gamma = max (or u + 3 sigma); a small regressor (``CADARegressor``, CADA's
network) learns to predict (u, gamma) from frozen backbone features of the image. At test time every map is
aligned by ``(map - u_hat) / (gamma_hat - u_hat)``, which puts the normal scores of every (implicit) type on one
scale, and the image score is the mean of the top 1% of the aligned map. Neither fit nor score can receive a type
label: CADA honours the Detector protocol.

In the lifecycle: ``extract`` fits the base (unless it came fitted) and collects its training maps' statistics
with the regressor's frozen features (``AlignmentData``); ``train_features`` trains the regressor on them;
``features`` of a batch are the base's maps with the regressor's features; ``score_features`` aligns the maps.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Subset

from omniad.backbone import Backbone
from omniad.calibration import Calibration
from omniad.data.images import check_image_batch
from omniad.data.sources import as_image_dataset, iterate_batches
from omniad.methods.base import BaseDetector, concat_scores
from omniad.methods.cada.alignment import TARGETS, align_with_spread, targets_from_moments
from omniad.methods.cada.base_reader import (
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
    own_geometry,
)
from omniad.methods.cada.network import CADARegressor, channel_statistics
from omniad.params import POSITIVE_INT, Interval, Options
from omniad.registry import detector_class, register_detector
from omniad.training import batch_indices, train
from omniad.types import AnomalyScores

OUT_OF_FOLD = 2  # folds of target_folds=None over a base that memorises its training images


@register_detector("cada")
class CADA(BaseDetector):
    """Class-agnostic distribution alignment over a base detector: one threshold for every type, no labels.

    ``create_detector("cada", base="revdist", base_params={"preset": "cpu"})``. ``fit(data)`` holds out
    ``calibration_fraction`` of the images first, fits the base on the rest (the base itself holds nothing out),
    computes the alignment targets from the base's maps of exactly those training images (out of fold for a base
    that memorises them: ``target_folds``), trains the regressor,
    then calibrates one threshold on the ALIGNED scores of the held-out normals (and the base's own threshold on
    its raw scores of the same images, ``base_.calibration_``, for comparison).

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
        target_folds: where the targets' maps come from. 0: the base's maps of its own training images (the
            paper's). k >= 2: out of fold: the images are cut into k seeded folds, and each fold's maps come from
            a copy of the base fitted on the other folds (k more base fits; the base that scores is still fitted
            on every image). A base that memorises its training images (PatchCore's bank holds their patches;
            PaDiM's Gaussians, with few images per feature dimension, fit them exactly) maps them flatter than
            any new normal image, so in-sample targets understate the spread CADA divides by. None: 2 for such
            bases (``memorises_training``), 0 for the trained ones. A fitted base instance: always 0.
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
        **common: see ``BaseDetector`` (CADA's defaults: sigma 0 (the base's maps are smoothed already) and
            image_pooling "top1" with top_fraction 0.01, the paper's image score).
    """

    test_params: dict[str, Any] = {"base": "padim", "iterations": 50}  # padim: the quickest base
    defaults = {"sigma": 0.0, "image_pooling": "top1"}
    constraints = {
        "target": Options(TARGETS),
        "target_folds": Interval(0, None, integer=True, allow_none=True),
        "feature_stage": Interval(0, None, integer=True, allow_none=True),
        "feature_size": Interval(1, None, integer=True, allow_none=True),
        "hidden": POSITIVE_INT,
        "dropout": Interval(0.0, 1.0, high_open=True),
        "alpha": Interval(0.0, None, low_open=True, allow_none=True),
        "iterations": POSITIVE_INT,
        "train_batch_size": POSITIVE_INT,
        "lr": Interval(0.0, None, low_open=True),
        "momentum": Interval(0.0, 1.0, high_open=True),
        "weight_decay": Interval(0.0, None),
    }
    wraps_base = True

    def __init__(
        self,
        *,
        base: str | BaseDetector = "revdist",
        base_params: dict[str, Any] | None = None,
        target: str = "max",
        target_folds: int | None = None,
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
        **common: Any,
    ) -> None:
        super().__init__(**common)
        self.base = base
        self.base_params = base_params
        self.target = target
        self.target_folds = target_folds
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

    # ----------------------------------------------------------------- parameters
    @property
    def base_name(self) -> str:
        return self.base.name if isinstance(self.base, BaseDetector) else self.base

    def get_params(self) -> dict[str, Any]:
        """As the base class; a base given as a detector instance is recorded by its name and parameters."""
        params = super().get_params()
        if isinstance(self.base, BaseDetector):
            params["base"], params["base_params"] = self.base.name, jsonable_params(self.base.get_params())
        else:
            params["base_params"] = jsonable_params(self.base_params)
        return params

    def derive_params(self, values: dict[str, Any]) -> dict[str, Any]:
        if isinstance(self.base, BaseDetector):
            if self.base_params:
                raise ValueError("cada: base_params cannot be combined with a base detector instance")
        elif not isinstance(self.base, str):
            raise TypeError(f"base must be a registered detector name or a detector, got {type(self.base).__name__}")
        name = self.base_name
        if values["alpha"] is None:
            values["alpha"] = PAPER_ALPHA.get(name)  # None: one standard deviation of the targets
        if values["iterations"] is None:
            values["iterations"] = PAPER_ITERATIONS.get(name, DEFAULT_ITERATIONS)
        if values["target_folds"] == 1:
            raise ValueError("cada: target_folds must be 0 (in-sample targets) or at least 2 folds, got 1")
        if isinstance(self.base, BaseDetector):
            if values["target_folds"]:
                raise ValueError("cada: target_folds needs copies of the base to fit; a fitted base instance "
                                 "gives in-sample targets only (target_folds=0)")
            values["target_folds"] = 0
        elif values["target_folds"] is None:
            memorises = getattr(detector_class(name), "memorises_training", False)
            values["target_folds"] = OUT_OF_FOLD if memorises else 0
        return values

    def build_frozen(self, pretrained: bool) -> None:
        """CADA's frozen part is its base's (built with it); its own backbone only when the base has none to tap."""
        self._pretrained = pretrained
        if isinstance(self.base, BaseDetector):
            self.base_ = self.base
            # the base handles tiling and padding for both: they must read images alike
            geometry = ("image_size", "tile_size", "tile_stride")
            base = self.base_.resolved_params()
            mine = tuple(_plain(getattr(self.resolved_, k)) for k in geometry)
            theirs = tuple(_plain(base[k]) for k in geometry)
            if mine != theirs:
                raise ValueError(f"cada: its image_size / tile_size / tile_stride {mine} differ from its base's "
                                 f"{theirs}; give CADA the same ones")
        else:
            common = {name: getattr(self, name) for name in SHARED_COMMON}
            self.base_ = build_base(self.base, jsonable_params(self.base_params), common)

    def holdout_backbone(self) -> tuple[Backbone | None, Any]:
        """The base's (CADA builds no backbone of its own to cluster the hold-out with)."""
        if getattr(self.base_, "backbone_", None) is None:
            self.base_.prepare()
        return self.base_.holdout_backbone()

    def _own_backbone(self, stage: int) -> Backbone:
        weights = self.weights if getattr(self, "_pretrained", True) else "random"
        self.feature_backbone_ = Backbone(self.backbone, (stage,), weights)
        return self.feature_backbone_.to(self.device_)

    def _attach_reader(self) -> None:
        self.feature_backbone_ = None
        self.reader_: FeatureReader = make_feature_reader(
            self.base_, self.resolved_.feature_stage, self._own_backbone, size=self.resolved_.feature_size
        )

    # ----------------------------------------------------------------- fitting
    def extract(self, data: Any) -> AlignmentData:
        """Fit the base on these images (unless it came fitted) and collect the alignment data from its maps of
        them: one collection can train several alignment heads over one base."""
        if not hasattr(self, "resolved_"):
            self.prepare()
        # tiled or aspect kept: the images as read; the base cuts tiles (or pads) itself and its maps of whole
        # images, stitched (or cropped), give the targets
        images = as_image_dataset(data, self.read_size) if own_geometry(self) else self.training_inputs(data)
        if not getattr(self.base_, "fitted_", False):
            self.base_.calibration_fraction = 0.0  # trained on all of these, so targets = the base's training maps
            self.base_.fit(images)
        self._attach_reader()
        folds = self.resolved_.target_folds
        if not folds or len(images) < folds:
            return collect_alignment_data(self.base_, self.reader_, images, self.batch_size, self.progress)
        return self._out_of_fold_data(images, folds)

    def _out_of_fold_data(self, images: Any, folds: int) -> AlignmentData:
        """Alignment data whose maps come, fold by fold, from copies of the base fitted on the other folds."""
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.seed))
        moments = torch.empty(0)
        features = torch.empty(0)
        parts = order.chunk(folds)
        for k, held in enumerate(parts):
            rest = torch.cat([part for j, part in enumerate(parts) if j != k])
            fold_base = self.base_.clone()
            fold_base.progress = self.progress
            fold_base.fit(Subset(images, sorted(rest.tolist())))
            held = held.sort().values
            part = collect_alignment_data(fold_base, self.reader_, Subset(images, held.tolist()), self.batch_size,
                                          self.progress)
            if k == 0:
                moments = part.moments.new_empty(len(images), *part.moments.shape[1:])
                features = part.features.new_empty(len(images), *part.features.shape[1:])
            moments[held], features[held] = part.moments, part.features
            del fold_base
        return AlignmentData(moments, features, self.reader_.stage)

    def train_features(self, data: AlignmentData) -> None:
        """Train the regressor on alignment data collected from the base's training maps (see ``extract``)."""
        r = self.resolved_
        if not hasattr(self, "reader_"):
            if not getattr(self.base_, "fitted_", False):
                raise ValueError("cada: the alignment data needs a fitted base: call extract(images) first")
            self._attach_reader()
        if data.stage != self.reader_.stage or data.features.shape[1] != self.reader_.channels:
            raise ValueError(
                f"the alignment data holds stage {data.stage} features ({data.features.shape[1]} channels) but this "
                f"CADA reads stage {self.reader_.stage} ({self.reader_.channels} channels)"
            )
        targets = targets_from_moments(data.moments, r.target)  # (u, gamma) per training image
        u, gamma = targets[:, 0], targets[:, 1]
        # The head predicts (u, spread = gamma - u): the same function class as predicting (u, gamma) (the last
        # layer is linear) and the same loss on (u_hat, gamma_hat = u_hat + spread_hat), but the spread the map
        # is divided by is then not a difference of two nearly equal numbers (1 ulp of u would move it).
        head_targets = torch.stack([u, gamma - u], 1)
        t_mean = head_targets.mean(0)
        t_scale = _scale(head_targets)
        u_scale, g_scale = float(t_scale[0]), float(_scale(gamma[:, None])[0])
        f_mean, f_scale = channel_statistics(data.features)
        self.regressor_ = CADARegressor(data.features.shape[1], 2, r.hidden, r.dropout)
        self.regressor_.set_normalisation(f_mean, f_scale, t_mean, t_scale)
        self.regressor_.to(self.device_)
        # Eq. 3, smooth-L1 on u plus smooth-L1 on gamma, each divided by its target's standard deviation (alpha
        # alike): the paper's loss per target up to a constant factor, so the same minimiser, but one SGD
        # learning rate suits bases whose scores differ by orders of magnitude. alpha None: beta = 1 std.
        beta_u = r.alpha / u_scale if r.alpha is not None else 1.0
        beta_g = r.alpha / g_scale if r.alpha is not None else 1.0
        mean, scale = t_mean.to(self.device_), t_scale.to(self.device_)
        features, targets = data.features, targets

        def loss_of_batch(step: int, index: Tensor, model: nn.Module) -> Tensor:
            out = model(features[index].to(self.device_), normalised=True) * scale + mean
            target = targets[index].to(self.device_)
            u_hat, g_hat = out[:, 0], out[:, 0] + out[:, 1]
            return F.smooth_l1_loss(u_hat / u_scale, target[:, 0] / u_scale, beta=beta_u) + F.smooth_l1_loss(
                g_hat / g_scale, target[:, 1] / g_scale, beta=beta_g
            )

        if len(data) == 0:
            raise ValueError("no training features for the alignment head")
        generator = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)  # dropout draws from the global generator
        optimizer = torch.optim.SGD(self.regressor_.parameters(), lr=r.lr, momentum=r.momentum,
                                    weight_decay=r.weight_decay)
        self.loss_history_ = train(
            self.regressor_, optimizer, batch_indices(len(data), r.train_batch_size, r.iterations, generator),
            loss_of_batch, total=r.iterations, desc="CADA regressor", progress=self.progress,
        )
        # A regressor far outside its training data may predict gamma <= u; clamp the spread to half the
        # smallest spread seen in training rather than flip or explode the map.
        self.min_spread_ = max(0.5 * float((gamma - u).min()), 1e-12)

    # ----------------------------------------------------------------- scoring
    def features(self, images: Tensor) -> list[Tensor]:
        """The base's anomaly maps of the batch and the regressor's frozen features (one backbone pass)."""
        raw, feats = self.reader_.base_and_features(self.base_, images.to(self.base_.device_))
        return [raw.anomaly_maps.to(self.device_), feats.to(self.device_)]

    def predict_statistics(self, features: Tensor) -> Tensor:
        """(B, 2) predicted (u_hat, gamma_hat) for frozen features of the regressor's stage."""
        out = self._predict(features)
        return torch.stack([out[:, 0], out[:, 0] + out[:, 1]], 1)

    @torch.no_grad()
    def _predict(self, features: Tensor) -> Tensor:
        """(B, 2) predicted (u_hat, gamma_hat - u_hat)."""
        self._check_fitted()
        return self.regressor_(features.to(self.device_).float())

    def score_features(self, features: list[Tensor]) -> Tensor:
        maps, feats = features
        out = self._predict(feats).to(maps.device)
        return align_with_spread(maps.float(), out[:, 0], out[:, 1], self.min_spread_)

    @torch.inference_mode()
    def score(self, images: Tensor) -> AnomalyScores:
        """As ``BaseDetector.score``. Tiled or aspect kept, the base scores the images as given (tiles stitched,
        padding cut) and CADA aligns those whole maps: one (u, gamma) per image, as the paper's targets are."""
        if not own_geometry(self):
            return super().score(images)
        self._check_fitted()
        return concat_scores([self._aligned(chunk)[1] for chunk in check_image_batch(images).split(self.batch_size)])

    def _aligned(self, images: Tensor) -> tuple[AnomalyScores, AnomalyScores]:
        """The base's scores of one batch (network inputs, or images as read when the base has its own geometry)
        and CADA's aligned scores, from one pass."""
        raw, feats = self.reader_.base_and_features(self.base_, images)
        maps = raw.anomaly_maps.to(self.device_).float()
        return raw, self.postprocess(self.score_features([maps, feats]), tuple(maps.shape[-2:]))

    @torch.no_grad()
    def score_with_base(self, data: Any) -> tuple[AnomalyScores, AnomalyScores]:
        """Scores of every image before (the base's) and after alignment, in one pass (on the CPU)."""
        self._check_fitted()
        raw_parts, aligned_parts = [], []
        for batch in iterate_batches(as_image_dataset(data, self.read_size), self.batch_size, self.progress,
                                     "scoring"):
            if not own_geometry(self):
                batch = batch.to(self.base_.device_)
            raw, aligned = self._aligned(batch)
            raw_parts.append(raw)
            aligned_parts.append(aligned)
        if not raw_parts:
            empty = AnomalyScores(torch.empty(0), torch.empty(0, *self.input_hw))
            return empty, empty
        return concat_scores(raw_parts), concat_scores(aligned_parts)

    def calibrate(self, normal_images: Any, target_far: float | None = None, source: str | None = None,
                  groups: Any = None) -> Calibration:
        """One threshold on the ALIGNED scores of these normal images (``calibration_``), and the base's on its
        raw scores of the same images (``base_.calibration_``, for comparison), in one pass."""
        self._check_fitted()
        far = self.target_far if target_far is None else target_far
        source = source or "calibrate() on given images"
        raw, aligned = self.score_with_base(normal_images)
        self.base_.calibration_ = Calibration.from_normal_scores(raw.image_scores, far, source, groups)
        self.calibration_ = Calibration.from_normal_scores(aligned.image_scores, far, source, groups)
        return self.calibration_

    # ----------------------------------------------------------------- export
    def export_blockers(self) -> list[str]:
        """The base's: its whole scoring path is part of CADA's graph."""
        return [f"its base {self.base_.name}: {reason}" for reason in self.base_.export_blockers()]

    def export_batch_size(self) -> int:
        return min(int(self.batch_size), self.base_.export_batch_size())

    # ----------------------------------------------------------------- persistence
    def modules(self) -> dict[str, nn.Module]:
        modules = {f"base.{name}": module for name, module in self.base_.saved_modules().items()}
        modules["regressor"] = self.regressor_
        if not self.reader_.shared:
            modules["features"] = self.feature_backbone_
        return modules

    def meta(self) -> dict[str, Any]:
        return {
            "base_meta": self.base_.fitted_meta(),
            "feature_stage": self.reader_.stage,
            "feature_shared": self.reader_.shared,
            "feature_channels": self.reader_.channels,
            "min_spread": self.min_spread_,
        }

    def build(self, meta: dict[str, Any]) -> None:
        """Rebuild the base from its part of the bundle, then the reader and the regressor."""
        self.base_.device, self.base_.progress = self.device, self.progress
        self.base_.rebuild(dict(meta["base_meta"]))
        self._attach_reader()
        if self.reader_.shared != meta["feature_shared"] or self.reader_.stage != meta["feature_stage"]:
            raise RuntimeError(
                f"the rebuilt base gives features of stage {self.reader_.stage} (shared={self.reader_.shared}); "
                f"the bundle was saved with stage {meta['feature_stage']} (shared={meta['feature_shared']})"
            )
        self.regressor_ = CADARegressor(int(meta["feature_channels"]), 2, self.resolved_.hidden,
                                        self.resolved_.dropout)
        self.min_spread_ = float(meta["min_spread"])
        if not self.min_spread_ > 0:
            raise ValueError(f"the bundle's min_spread must be a positive number, got {meta['min_spread']!r}")


def _plain(value: Any) -> Any:
    """A pair as a tuple, whether it came as a list (JSON) or a tuple."""
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _scale(values: Tensor) -> Tensor:
    """Per-column standard deviation, floored so that constant targets do not divide by zero."""
    return values.std(0, unbiased=False).clamp_min(1e-6 * (1.0 + float(values.abs().max())))
