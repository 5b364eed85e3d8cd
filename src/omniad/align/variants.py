"""Class-aware distribution alignment (CADA paper, Sec. 3.2 and Table 4): the label-using predecessors of CADA.

- ``ClassAwareA`` (Fig. 4a): type labels at training AND test time; each test map is aligned with the per-type
  statistics (u_c, gamma_c) of that type's training maps.
- ``ClassAwareB`` (Fig. 4b): type labels at training time only; a classifier with the regressor's structure
  (1 conv, 2 linear, dropout) is trained on frozen features with cross-entropy and predicts the type at test
  time, whose statistics then align the map.

They are reference points (the paper calls A the upper-bound baseline), not detectors of the absolute-unified
setting: their ``fit`` needs type labels, which the Detector protocol forbids (DESIGN.md section 1). That is why
they are NOT registered: the registry holds only detectors that honour ``fit(data)`` / ``score(images)``, the
registry-wide contract test fits every registered name without labels, and ``omniad fit`` must never need them.
They do not save to bundles (``load_detector`` restores registered detectors only); refit them (cheap: the heavy
part, the base, can be a fitted instance shared with CADA).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from omniad.align.core import (
    DEFAULT_ITERATIONS,
    PAPER_ITERATIONS,
    AlignmentData,
    build_base,
    collect_alignment_data,
    jsonable_params,
    make_feature_reader,
    train_head,
)
from omniad.align.regressor import CADARegressor, channel_statistics
from omniad.align.stats import _check_target, align_maps, class_statistics
from omniad.backbone import Backbone
from omniad.data.sources import as_image_dataset, split_holdout
from omniad.methods.base import BaseDetector, NotFittedError
from omniad.postprocess import image_score
from omniad.runtime import resolve_device, seed_everything
from omniad.types import AnomalyScores


class _ClassAwareAlignment:
    """Shared fit/score skeleton of the class-aware variants.

    Args:
        base: registered name of the base detector, or a fitted detector instance (then only the alignment is
            trained; give ``fit`` the images that base was trained on).
        base_params: hyper-parameters of the base.
        target: "max" (gamma_c = mean of per-image maxima, the paper's practice) or "u_sigma" (u_c + 3 sigma_c).
        image_pooling: image score from the aligned map: "top1", "max" or "maxpool".
        top_fraction: share of the highest aligned pixel scores averaged into the image score (paper: 0.01).
        calibration_fraction: share of the training images held out for the threshold.
        target_far: false-alarm rate of the threshold on the held-out normals.
        backbone, weights, image_size, device, seed, batch_size, progress: as for ``BaseDetector``; handed on
            to the base it builds.
    """

    needs_features = False
    name = "class_aware"

    def __init__(
        self,
        *,
        base: str | BaseDetector = "revdist",
        base_params: dict[str, Any] | None = None,
        target: str = "max",
        image_pooling: str = "top1",
        top_fraction: float = 0.01,
        calibration_fraction: float = 0.1,
        target_far: float = 0.01,
        backbone: str = "tf_efficientnet_lite0",
        weights: str = "auto",
        image_size: int = 256,
        device: str = "auto",
        seed: int = 0,
        batch_size: int = 16,
        progress: bool = True,
    ) -> None:
        _check_target(target)
        self._base_instance = base if isinstance(base, BaseDetector) else None
        self.base = base.name if isinstance(base, BaseDetector) else base
        self.base_params = jsonable_params(base.get_params() if isinstance(base, BaseDetector) else base_params)
        self.target = target
        self.image_pooling = image_pooling
        self.top_fraction = top_fraction
        self.calibration_fraction = calibration_fraction
        self.target_far = target_far
        self.backbone = backbone
        self.weights = weights
        self.image_size = image_size
        self.device = device
        self.seed = seed
        self.batch_size = batch_size
        self.progress = progress
        self._loading = False

    # ----------------------------------------------------------------- fitting
    def fit(self, data: Any, categories: Sequence[str]) -> _ClassAwareAlignment:
        """Fit base (unless given fitted), per-type statistics (and B's classifier) on labelled normal images.

        Args:
            data: normal training images of every type (dataset of ``Sample``, sequence of tensors, tensor).
            categories: the type of each training image, in order (e.g. ``[s.category for s in train]``).
        """
        seed_everything(self.seed)
        self.device_ = resolve_device(self.device)
        images = as_image_dataset(data)
        categories = _check_categories(categories, len(images))
        train, holdout = split_holdout(images, self.calibration_fraction, self.seed)
        train_categories = categories if holdout is None else [categories[i] for i in train.indices]
        self.fit_alignment(self.collect(train), train_categories)
        if holdout is not None:
            self.calibrate(holdout, [categories[i] for i in holdout.indices])
        return self

    def collect(self, images: Any) -> AlignmentData:
        """Fit the base on ``images`` unless it came fitted; collect map statistics (and features for B)."""
        if not hasattr(self, "device_"):
            self.device_ = resolve_device(self.device)
        images = as_image_dataset(images)
        base = self._base_instance
        if base is None:
            common = {k: getattr(self, k) for k in ("backbone", "weights", "image_size", "device", "seed",
                                                     "batch_size", "progress")}
            base = build_base(self.base, self.base_params, common)
        if not getattr(base, "fitted_", False):
            base.calibration_fraction = 0.0  # trained on all of these, so statistics = its training maps
            base.fit(images)
        self._attach_base(base)
        return collect_alignment_data(base, self.reader_, images, self.batch_size, self.progress)

    def _attach_base(self, base: BaseDetector) -> None:
        self.base_ = base
        self.reader_ = (
            make_feature_reader(base, self._feature_stage(), self._own_backbone, size=self._feature_size())
            if self.needs_features
            else None
        )

    def _feature_stage(self) -> int | None:
        return None

    def _feature_size(self) -> int | None:
        return None

    def _own_backbone(self, stage: int) -> Backbone:
        return Backbone(self.backbone, (stage,), self.weights).to(self.device_)

    def fit_alignment(self, data: AlignmentData, categories: Sequence[str]) -> _ClassAwareAlignment:
        """Per-type statistics (and the classifier) from alignment data of labelled training images."""
        if not hasattr(self, "base_"):
            if self._base_instance is None or not getattr(self._base_instance, "fitted_", False):
                raise NotFittedError("fit_alignment needs a fitted base: call collect(images) or fit(...) first")
            self.device_ = resolve_device(self.device)
            self._attach_base(self._base_instance)
        categories = _check_categories(categories, len(data))
        self.stats_ = class_statistics(data.moments, categories, self.target)
        self.classes_ = sorted(self.stats_)
        spreads = [g - u for u, g in self.stats_.values()]
        self.min_spread_ = max(0.5 * min(spreads), 1e-12)
        self._fit_head(data, categories)
        self.fitted_ = True
        self.threshold_ = float("nan")
        return self

    def _fit_head(self, data: AlignmentData, categories: list[str]) -> None:
        """Train whatever predicts the type at test time (nothing for A)."""

    # ----------------------------------------------------------------- scoring
    def _check_fitted(self) -> None:
        if not getattr(self, "fitted_", False):
            raise NotFittedError(f"{type(self).__name__} is not fitted yet: call fit(data, categories)")

    def align_with_categories(self, maps: Tensor, categories: Sequence[str]) -> AnomalyScores:
        """Align maps with the statistics of the given types; pool the image scores."""
        self._check_fitted()
        unknown = sorted(set(categories) - set(self.stats_))
        if unknown:
            raise ValueError(f"unknown categories {unknown}: this alignment was fitted on {', '.join(self.classes_)}")
        u = torch.tensor([self.stats_[c][0] for c in categories], dtype=torch.float32, device=maps.device)
        gamma = torch.tensor([self.stats_[c][1] for c in categories], dtype=torch.float32, device=maps.device)
        aligned = align_maps(maps.float(), u, gamma, self.min_spread_)
        return AnomalyScores(image_score(aligned, self.image_pooling, fraction=self.top_fraction), aligned)

    def _categories_for(self, features: Tensor, categories: Sequence[str] | None) -> list[str]:
        raise NotImplementedError

    @torch.no_grad()
    def score(self, images: Tensor, categories: Sequence[str] | None = None) -> AnomalyScores:
        """Aligned scores of a (B, 3, H, W) batch in [0, 1] (on the CPU)."""
        self._check_fitted()
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError("score expects a (B, 3, H, W) float tensor")
        out_s, out_m = [], []
        for start in range(0, images.shape[0], self.batch_size):
            batch = images[start : start + self.batch_size].to(self.base_.device_)
            cats = None if categories is None else list(categories[start : start + self.batch_size])
            if self.reader_ is None:
                raw, features = self.base_._score(batch), None
            else:
                raw, features = self.reader_.base_and_features(self.base_, batch)
            result = self.align_with_categories(raw.anomaly_maps, self._categories_for(features, cats))
            out_s.append(result.image_scores.float().cpu())
            out_m.append(result.anomaly_maps.float().cpu())
        return AnomalyScores(torch.cat(out_s), torch.cat(out_m))

    def calibrate(self, normal_images: Any, categories: Sequence[str] | None = None, target_far: float | None = None
                  ) -> float:
        """One threshold on the aligned scores of held-out normal images (``threshold_``)."""
        from omniad.calibration import threshold_at_far
        from omniad.data.sources import iterate_batches

        far = self.target_far if target_far is None else target_far
        scores, start = [], 0
        for batch in iterate_batches(normal_images, self.batch_size, False):
            cats = None if categories is None else list(categories[start : start + len(batch)])
            scores.append(self.score(batch, cats).image_scores)
            start += len(batch)
        self.calibration_scores_ = torch.cat(scores)
        self.threshold_ = threshold_at_far(self.calibration_scores_.numpy(), far)
        return self.threshold_


class ClassAwareA(_ClassAwareAlignment):
    """Class-aware alignment A: per-type (u_c, gamma_c) from training maps; the test type must be given.

    ``fit(data, categories)``, ``score(images, categories)`` (required). Parameters: see ``_ClassAwareAlignment``.
    """

    name = "class_aware_a"

    def _categories_for(self, features: Tensor | None, categories: Sequence[str] | None) -> list[str]:
        if categories is None:
            raise ValueError("class-aware alignment A needs the type of every test image: score(images, categories)")
        return list(categories)

    def score(self, images: Tensor, categories: Sequence[str] | None = None) -> AnomalyScores:
        """Aligned scores; ``categories`` (one type per image) is required."""
        if categories is None:
            raise ValueError("class-aware alignment A needs the type of every test image: score(images, categories)")
        if len(categories) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(categories)} categories")
        return super().score(images, categories)


class ClassAwareB(_ClassAwareAlignment):
    """Class-aware alignment B: a classifier trained with the type labels predicts each test image's type.

    Args:
        feature_stage: backbone stage the classifier reads (None: the deepest of the base's backbone, else 3).
        feature_size: larger feature maps are average-pooled to this size (8, as CADA's regressor).
        hidden: hidden width of the classifier's linear layers (256, as the regressor).
        dropout: dropout before each linear layer (0.25, as the regressor).
        iterations: SGD iterations (None: the CADA regressor's paper count for this base).
        train_batch_size: classifier mini-batch size.
        lr: SGD learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        **kwargs: see ``_ClassAwareAlignment``.
    """

    needs_features = True
    name = "class_aware_b"

    def __init__(
        self,
        *,
        feature_stage: int | None = None,
        feature_size: int | None = 8,
        hidden: int = 256,
        dropout: float = 0.25,
        iterations: int | None = None,
        train_batch_size: int = 16,
        lr: float = 5e-2,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.feature_stage = feature_stage
        self.feature_size = feature_size
        self.hidden = hidden
        self.dropout = dropout
        self.iterations = iterations
        self.train_batch_size = train_batch_size
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay

    def _feature_stage(self) -> int | None:
        return self.feature_stage

    def _feature_size(self) -> int | None:
        return self.feature_size

    def _fit_head(self, data: AlignmentData, categories: list[str]) -> None:
        index = {c: i for i, c in enumerate(self.classes_)}
        labels = torch.tensor([index[c] for c in categories], dtype=torch.long)
        self.classifier_ = CADARegressor(data.features.shape[1], len(self.classes_), self.hidden, self.dropout)
        f_mean, f_scale = channel_statistics(data.features)
        self.classifier_.set_normalisation(f_mean, f_scale, None, None)
        iterations = self.iterations or PAPER_ITERATIONS.get(self.base, DEFAULT_ITERATIONS)
        self.loss_history_ = train_head(
            self.classifier_, data.features, labels, F.cross_entropy,
            iterations=iterations, batch_size=self.train_batch_size, lr=self.lr, momentum=self.momentum,
            weight_decay=self.weight_decay, seed=self.seed, device=self.device_, progress=self.progress,
            desc="type classifier",
        )

    @torch.no_grad()
    def predict_categories_from_features(self, features: Tensor) -> list[str]:
        """The most probable type of each image, from frozen features of the classifier's stage."""
        self._check_fitted()
        logits = self.classifier_.forward_normalised(features.to(self.device_).float())
        return [self.classes_[i] for i in logits.argmax(1).tolist()]

    @torch.no_grad()
    def predict_categories(self, images: Tensor) -> list[str]:
        """The most probable type of each (B, 3, H, W) image."""
        self._check_fitted()
        return self.predict_categories_from_features(self.reader_.features(images.to(self.device_)))

    def _categories_for(self, features: Tensor | None, categories: Sequence[str] | None) -> list[str]:
        if categories is not None:
            raise ValueError("class-aware alignment B predicts the type; pass no categories (use ClassAwareA)")
        return self.predict_categories_from_features(features)


def _check_categories(categories: Sequence[str] | None, n: int) -> list[str]:
    if categories is None or isinstance(categories, str):
        raise ValueError("class-aware alignment needs one type label per training image: fit(data, categories)")
    categories = [str(c) for c in categories]
    if len(categories) != n:
        raise ValueError(f"got {n} images but {len(categories)} categories")
    return categories


__all__ = ["ClassAwareA", "ClassAwareB"]
