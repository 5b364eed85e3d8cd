"""Class-aware distribution alignment (CADA paper, Sec. 3.2 and Table 4): the label-using predecessors of CADA.

- ``ClassAwareA`` (Fig. 4a): type labels at training AND test time; each test map is aligned with the per-type
  statistics (u_c, gamma_c) of that type's training maps.
- ``ClassAwareB`` (Fig. 4b): type labels at training time only; a classifier with the regressor's structure
  (1 conv, 2 linear, dropout) is trained on frozen features with cross-entropy and predicts the type at test
  time, whose statistics then align the map.

They are reference points (the paper calls A the upper-bound baseline), not detectors of the absolute-unified
setting: their ``fit`` needs type labels, which the Detector protocol forbids (docs/architecture.md). That is why
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

from omniad.calibration import Calibration
from omniad.data.sources import as_image_dataset, iterate_batches, split_holdout
from omniad.methods.base import NotFittedError
from omniad.methods.cada import CADA
from omniad.methods.cada.alignment import align_maps, class_statistics
from omniad.methods.cada.base_reader import AlignmentData
from omniad.methods.cada.network import CADARegressor, channel_statistics
from omniad.runtime import seed_everything
from omniad.training import batch_indices, train
from omniad.types import AnomalyScores


class _ClassAwareAlignment(CADA):
    """The lifecycle of CADA (base, hold-out, alignment data, features, post-processing) with per-type
    statistics instead of a regressor; ``fit`` and ``score`` take the type labels CADA does without.

    Parameters: as ``CADA`` (its regressor's are the classifier's for B); ``target`` "max" takes gamma_c as the
    mean of the per-image maxima (the paper's practice), "u_sigma" u_c + 3 sigma_c.
    """

    name = "class_aware"
    # type labels come per image, and fit/score read whole images at the square image_size: refused, by the base's
    # parameter check, are tiling and an (height, width) image_size, which CADA itself supports
    supports_input_modes = False

    # ----------------------------------------------------------------- fitting
    def fit(self, data: Any, categories: Sequence[str]) -> _ClassAwareAlignment:
        """Fit base (unless given fitted), per-type statistics (and B's classifier) on labelled normal images.

        Args:
            data: normal training images of every type (dataset of ``Sample``, sequence of tensors, tensor).
            categories: the type of each training image, in order (e.g. ``[s.category for s in train]``).
        """
        seed_everything(self.seed)
        self.fitted_, self.calibration_ = False, None
        self.prepare()
        images = as_image_dataset(data, self.image_size)
        categories = _check_categories(categories, len(images))
        train_set, holdout = split_holdout(images, self.calibration_fraction, self.seed)
        train_categories = categories if holdout is None else [categories[i] for i in train_set.indices]
        self.fit_features(self.extract(train_set), categories=train_categories)
        if holdout is not None:
            self.calibrate(holdout, [categories[i] for i in holdout.indices])
        return self

    def train_features(self, data: AlignmentData, categories: Sequence[str] | None = None) -> None:
        """Per-type statistics (and the classifier) from alignment data of labelled training images."""
        if not hasattr(self, "reader_"):
            if not getattr(self.base_, "fitted_", False):
                raise NotFittedError("the alignment data needs a fitted base: call extract(images) first")
            self._attach_reader()
        categories = _check_categories(categories, len(data))
        self.stats_ = class_statistics(data.moments, categories, self.resolved_.target)
        self.classes_ = sorted(self.stats_)
        spreads = [g - u for u, g in self.stats_.values()]
        self.min_spread_ = max(0.5 * min(spreads), 1e-12)
        self._fit_head(data, categories)

    def _fit_head(self, data: AlignmentData, categories: list[str]) -> None:
        """Train whatever predicts the type at test time (nothing for A)."""

    # ----------------------------------------------------------------- scoring
    def align_with_categories(self, maps: Tensor, categories: Sequence[str]) -> AnomalyScores:
        """Align maps with the statistics of the given types; pool the image scores."""
        self._check_fitted()
        unknown = sorted(set(categories) - set(self.stats_))
        if unknown:
            raise ValueError(f"unknown categories {unknown}: this alignment was fitted on {', '.join(self.classes_)}")
        u = torch.tensor([self.stats_[c][0] for c in categories], dtype=torch.float32, device=maps.device)
        gamma = torch.tensor([self.stats_[c][1] for c in categories], dtype=torch.float32, device=maps.device)
        return self.postprocess(align_maps(maps.float(), u, gamma, self.min_spread_), tuple(maps.shape[-2:]))

    def _categories_for(self, features: Tensor, categories: Sequence[str] | None) -> list[str]:
        raise NotImplementedError

    @torch.no_grad()
    def score(self, images: Tensor, categories: Sequence[str] | None = None) -> AnomalyScores:
        """Aligned scores of a (B, 3, H, W) batch in [0, 1] (on the CPU)."""
        self._check_fitted()
        images = self.preprocess(images)
        out_s, out_m = [], []
        for start in range(0, images.shape[0], self.batch_size):
            maps, feats = self.features(images[start : start + self.batch_size].to(self.device_))
            cats = None if categories is None else list(categories[start : start + self.batch_size])
            result = self.align_with_categories(maps, self._categories_for(feats, cats))
            out_s.append(result.image_scores.float().cpu())
            out_m.append(result.anomaly_maps.float().cpu())
        return AnomalyScores(torch.cat(out_s), torch.cat(out_m))

    def calibrate(self, normal_images: Any, categories: Sequence[str] | None = None, target_far: float | None = None
                  ) -> Calibration:
        """One threshold on the aligned scores of held-out normal images (``calibration_``)."""
        far = self.target_far if target_far is None else target_far
        scores, start = [], 0
        for batch in iterate_batches(as_image_dataset(normal_images, self.image_size), self.batch_size, False):
            cats = None if categories is None else list(categories[start : start + len(batch)])
            scores.append(self.score(batch, cats).image_scores)
            start += len(batch)
        self.calibration_ = Calibration.from_normal_scores(torch.cat(scores), far, "held-out labelled normals")
        return self.calibration_

    def save(self, path: str) -> None:
        raise NotImplementedError(f"{type(self).__name__} is a label-using reference and is not saved; refit it")


class ClassAwareA(_ClassAwareAlignment):
    """Class-aware alignment A: per-type (u_c, gamma_c) from training maps; the test type must be given.

    ``fit(data, categories)``, ``score(images, categories)`` (required). Parameters: see ``CADA``.
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
    """Class-aware alignment B: a classifier with the regressor's structure (``hidden``, ``dropout``,
    ``iterations``, ``lr``, ...: see ``CADA``), trained with the type labels, predicts each test image's type."""

    name = "class_aware_b"

    def _fit_head(self, data: AlignmentData, categories: list[str]) -> None:
        r = self.resolved_
        index = {c: i for i, c in enumerate(self.classes_)}
        labels = torch.tensor([index[c] for c in categories], dtype=torch.long)
        self.classifier_ = CADARegressor(data.features.shape[1], len(self.classes_), r.hidden, r.dropout)
        f_mean, f_scale = channel_statistics(data.features)
        self.classifier_.set_normalisation(f_mean, f_scale, None, None)
        self.classifier_.to(self.device_)
        features = data.features
        generator = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)  # dropout draws from the global generator
        optimizer = torch.optim.SGD(self.classifier_.parameters(), lr=r.lr, momentum=r.momentum,
                                    weight_decay=r.weight_decay)

        def loss_of_batch(step: int, idx: Tensor, model: torch.nn.Module) -> Tensor:
            logits = model(features[idx].to(self.device_), normalised=True)
            return F.cross_entropy(logits, labels[idx].to(self.device_))

        self.loss_history_ = train(
            self.classifier_, optimizer, batch_indices(len(data), r.train_batch_size, r.iterations, generator),
            loss_of_batch, total=r.iterations, desc="type classifier", progress=self.progress,
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
        return self.predict_categories_from_features(self.reader_.features(self.preprocess(images).to(self.device_)))

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
