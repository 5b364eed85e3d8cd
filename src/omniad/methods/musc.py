"""Zero-shot mutual scoring, in the spirit of MuSc (Li et al., ICLR 2024, "MuSc: Zero-Shot Industrial Anomaly
Classification and Segmentation with Mutual Scoring of the Unlabeled Images").

No normal image of the product type is needed: the images of one unlabelled test batch score each other. Normal
patches of a type recur in most images of that type, a defect is rare, so a patch is anomalous when it is far from
the patches of the OTHER images.

    features      frozen backbone stage maps of every image of the call
    per degree r  MuSc's local neighbourhood aggregation (LNAMD): each stage averaged over r x r neighbourhoods,
                  the stages fused on the finest grid
    mutual score  for patch p of image i and every other image j: d_j(p) = min_q |f_i(p) - f_j(q)|; the patch
                  score is the mean of the smallest ``interval_fraction`` share of the d_j(p) (MuSc's interval
                  average: a defect seen in a few other images still scores high)
    map           the mean over the degrees, then the base's score tail (sigma 4, image score = map maximum)

MuSc's image-level re-scoring (RsCIN) and its ViT backbone are not reproduced: the backbone is the project's frozen
CNN, like every other method here.

What ``fit`` does: nothing is learned. It only sets the detector up and, with ``calibration_fraction`` > 0, sets a
threshold on the held-out training images scored against each other (a threshold for the types they show; for a
new type, calibrate on its normal images: ``omniad calibrate``).

What ``score`` does with few images: it scores every image of the call against the other images of the same call
(never in chunks, so an image's score does not depend on the batch size or on the order), and refuses a call with
fewer than 2 images (there is nothing to compare with). An image's score does depend on which other images share
its call; a batch should hold mostly normal images of one type, as a production lot does.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omniad.data.sources import as_image_dataset
from omniad.features import feature_cat, feature_count, feature_to, fuse_stages
from omniad.methods.base import BaseDetector, concat_scores
from omniad.params import POSITIVE_INT, Each, Interval
from omniad.registry import register_detector
from omniad.types import AnomalyScores

# patches compared with one image's patches at once: memory stays at PAIR_CHUNK x patches x 4 bytes
PAIR_CHUNK = 1 << 16


def aggregate(stages: list[Tensor], degree: int) -> Tensor:
    """MuSc's LNAMD at one degree: every stage map averaged over ``degree`` x ``degree`` neighbourhoods (border
    neighbourhoods over their real patches only), fused on the finest grid. (B, C, h, w)."""
    if degree > 1:
        stages = [F.avg_pool2d(s, degree, stride=1, padding=degree // 2, count_include_pad=False) for s in stages]
    return fuse_stages(stages)


def mutual_scores(patches: Tensor, interval_fraction: float) -> Tensor:
    """The mutual score of every patch of every image against the other images.

    Args:
        patches: (B, N, C) patch features of B >= 2 images.
        interval_fraction: share of the B - 1 per-image nearest distances averaged, the smallest first (MuSc: 0.3;
            at least one distance).

    Returns:
        (B, N) scores. Permuting the images permutes the rows and changes nothing else.
    """
    b, n, c = patches.shape
    if b < 2:
        raise ValueError("mutual scoring needs at least 2 images: each image is scored against the others")
    keep = max(1, math.ceil(interval_fraction * (b - 1)))
    per_chunk = max(1, PAIR_CHUNK // n)
    out = torch.empty(b, n, dtype=torch.float32, device=patches.device)
    for i in range(b):
        nearest = torch.full((b, n), math.inf, device=patches.device)  # (other image, patch of image i)
        for start in range(0, b, per_chunk):
            others = patches[start : start + per_chunk]  # (k, N, C)
            dist = torch.cdist(patches[i].unsqueeze(0).expand(others.shape[0], -1, -1), others)  # (k, N, N)
            nearest[start : start + others.shape[0]] = dist.amin(-1)
        nearest[i] = math.inf  # an image is never compared with itself
        out[i] = nearest.sort(0).values[:keep].mean(0)
    return out


@register_detector("musc")
class MuSc(BaseDetector):
    """Zero-shot mutual scoring (MuSc-style): the images of one call score each other; no normal images needed.

    Args:
        stages: backbone feature indices whose maps are compared (fused on the finest of their grids).
        aggregation_degrees: MuSc's r of the local neighbourhood aggregation; the maps of every degree are averaged
            (MuSc: 1, 3, 5).
        interval_fraction: MuSc's interval average: a patch's score is the mean of the smallest share of its
            nearest distances to each other image (MuSc: 0.3).
        **common: see ``BaseDetector`` (MuSc's defaults: sigma 4, image_pooling "max", the map's maximum).
    """

    test_params: dict[str, Any] = {}
    defaults = {"sigma": 4.0, "image_pooling": "max"}
    constraints = {
        "stages": Each(Interval(0, None, integer=True)),
        "aggregation_degrees": Each(POSITIVE_INT),
        "interval_fraction": Interval(0.0, 1.0, low_open=True),
    }
    min_score_batch = 2
    supports_input_modes = False  # its own ``score`` compares whole images of one call; tiles would compare tile sets

    def __init__(
        self,
        *,
        stages: tuple[int, ...] = (2, 3),
        aggregation_degrees: tuple[int, ...] = (1, 3, 5),
        interval_fraction: float = 0.3,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        self.stages = stages
        self.aggregation_degrees = aggregation_degrees
        self.interval_fraction = interval_fraction

    def train_features(self, features: Any) -> None:
        """Nothing to learn: MuSc is training-free (``fit`` only sets up and calibrates)."""

    def score_features(self, features: list[Tensor]) -> Tensor:
        """(B, h, w) mutual scores of the images of ``features``, averaged over the aggregation degrees."""
        r = self.resolved_
        maps = []
        for degree in r.aggregation_degrees:
            fused = aggregate(list(features), degree)
            b, _, h, w = fused.shape
            maps.append(mutual_scores(fused.flatten(2).transpose(1, 2), r.interval_fraction).view(b, h, w))
        return torch.stack(maps).mean(0)

    # every image of a call against all the others: the base's chunking by batch_size would make an image's
    # score depend on which chunk it fell in, so features are extracted in batches and scored all at once
    @torch.inference_mode()
    def score(self, images: Tensor) -> AnomalyScores:
        self._check_fitted()
        images = self.preprocess(images)
        parts = [feature_to(self.features(images[s : s + self.batch_size].to(self.device_)), "cpu", torch.float32)
                 for s in range(0, images.shape[0], self.batch_size)]
        return self.score_cached(feature_cat(parts))

    @torch.no_grad()
    def score_cached(self, features: Any) -> AnomalyScores:
        self._check_fitted()
        count = feature_count(features)
        if count < self.min_score_batch:
            raise ValueError(f"musc scores the images of one call against each other: it needs at least "
                             f"{self.min_score_batch} images, got {count} (score a lot of the new type at once)")
        raw = self.score_features(feature_to(features, self.device_, torch.float32))
        size = (self.image_size, self.image_size)
        return concat_scores([self.postprocess(raw[s : s + self.batch_size], size)
                         for s in range(0, count, self.batch_size)])

    def score_dataset(self, data: Any, desc: str = "scoring") -> AnomalyScores:
        images = as_image_dataset(data, self.image_size)
        if len(images) == 0:
            return AnomalyScores(torch.empty(0), torch.empty(0, self.image_size, self.image_size))
        return self.score_cached(self.extract(images))

    def calibrate(self, normal_images: Any, target_far: float | None = None, source: str | None = None,
                  groups: Any = None) -> Any:
        """The base's calibration, the normal images scored against each other (so at least 2 of them)."""
        count = len(as_image_dataset(normal_images))
        if count < self.min_score_batch:
            raise ValueError(f"musc calibrates on normal images scored against each other: it needs at least "
                             f"{self.min_score_batch}, got {count} (at fit: raise calibration_fraction, or set it "
                             "to 0 and calibrate on normal images of the type to inspect)")
        return super().calibrate(normal_images, target_far, source, groups)

    def export_blockers(self) -> list[str]:
        return ["musc scores every image against the other images of the same call; an exported graph runs in "
                "chunks of a fixed size, which would change the scores"]

    def modules(self) -> dict[str, nn.Module]:
        return {}

    def build(self, meta: dict[str, Any]) -> None:
        """Nothing to build: the bundle holds the backbone only."""


__all__ = ["MuSc", "aggregate", "mutual_scores"]
