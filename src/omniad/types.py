"""The core contracts every component speaks: samples, scores and the Detector protocol."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

from torch import Tensor


@dataclass
class Sample:
    """One image with its evaluation metadata.

    Attributes:
        image: (3, H, W) float tensor in [0, 1].
        mask: (H, W) float tensor of 0/1 (1 = defect pixel). All zeros for normal images; for a defective image
            of a category without ground truth it is all zeros too and ``has_mask`` is False.
        label: 0 = normal, 1 = anomalous.
        category: product type. Metadata for evaluation only: no detector may read it.
        defect_type: "good" for normal images, else the defect folder name.
        path: the file the image was read from ("" for in-memory images).
        has_mask: whether pixel ground truth exists for this sample's category.
    """

    image: Tensor
    mask: Tensor
    label: int
    category: str
    defect_type: str = "good"
    path: str = ""
    has_mask: bool = True


class AnomalyScores(NamedTuple):
    """What ``Detector.score`` returns. Higher = more anomalous, for both fields."""

    image_scores: Tensor  # (B,)
    anomaly_maps: Tensor  # (B, H, W) at the input resolution (score_dataset: a list of maps when sizes differ)


@runtime_checkable
class Detector(Protocol):
    """A model trained on normal images of every category at once, without labels."""

    def fit(self, data: Any) -> Detector: ...

    def score(self, images: Tensor) -> AnomalyScores: ...

    def save(self, path: str) -> None: ...
