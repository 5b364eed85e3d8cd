"""What CADA (and the class-aware variants in ``omniad.align``) need of the wrapped base detector: building it,
reading frozen features next to its anomaly maps, and collecting the training statistics once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from omniad.backbone import Backbone
from omniad.data.sources import iterate_batches
from omniad.features import area_resize
from omniad.methods.base import BaseDetector, whole_square_input
from omniad.methods.cada.alignment import map_moments
from omniad.types import AnomalyScores

# The paper's per-base settings (Sec. 4.2). Bases it did not use get the fallbacks below.
PAPER_ALPHA = {"revdist": 0.1, "recontrast": 0.1, "uniad": 10.0}
PAPER_ITERATIONS = {"revdist": 5000, "recontrast": 5000, "uniad": 20000}
DEFAULT_ITERATIONS = 5000
# Hyper-parameters every detector shares that a wrapper hands on to the base it builds (unless base_params says
# otherwise). calibration_fraction is not among them: the wrapper holds out and calibrates on its own level.
# Tiling and an (height, width) image_size go to the base too: the base then handles the geometry (cuts and
# stitches tiles, pads and crops) and the wrapper aligns the base's maps of whole images (``own_geometry``).
SHARED_COMMON = ("backbone", "weights", "image_size", "tile_size", "tile_stride", "device", "seed", "batch_size",
                 "progress")


def own_geometry(base: BaseDetector) -> bool:
    """Whether the base takes images as read (tiled: at their own size; (height, width) image_size: aspect kept)
    and returns maps of their whole content, rather than taking network inputs of its square image_size."""
    return not whole_square_input(base.image_size, base.tile_size)


def jsonable_params(params: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of ``params`` with tuples turned into lists (what a bundle's JSON gives back on loading)."""

    def convert(value: Any) -> Any:
        if isinstance(value, (tuple, list)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    if params is not None and not isinstance(params, dict):
        raise TypeError(f"base_params must be a dict of the base detector's hyper-parameters, got {type(params)}")
    return {k: convert(v) for k, v in (params or {}).items()}


def build_base(name: str, base_params: dict[str, Any], common: dict[str, Any]) -> BaseDetector:
    """Create the (unfitted) base detector ``name`` with ``base_params`` on top of the wrapper's shared settings.

    The base never holds out calibration images of its own (calibration_fraction = 0): the wrapper holds them out
    before the base is fitted, so they are excluded from the base's training and from the alignment targets.
    """
    from omniad.registry import detector_class

    cls = detector_class(name)
    if not issubclass(cls, BaseDetector):
        raise TypeError(f"base detector {name!r} is not a BaseDetector and cannot be wrapped")
    if getattr(cls, "wraps_base", False):
        raise ValueError(f"{name!r} already wraps a base detector; wrap the base itself instead")
    if cls.min_score_batch > 1:
        raise ValueError(f"{name!r} scores the images of a call against each other, so its maps of one image "
                         "depend on the others: CADA cannot align them")
    known = set(cls.param_names())
    unknown = sorted(set(base_params) - known)
    if unknown:
        raise ValueError(f"unknown parameters {unknown} for base {name!r}; known: {', '.join(sorted(known))}")
    params = {k: v for k, v in common.items() if k in SHARED_COMMON and k in known}
    params.update({k: tuple(v) if isinstance(v, list) else v for k, v in base_params.items()})
    params["calibration_fraction"] = 0.0
    return cls(**params)


def _saved_with_base(base: BaseDetector, module: nn.Module) -> bool:
    """Whether ``module`` is part of what the base saves (so its weights travel in the base's part of a bundle)."""
    try:
        modules = base.saved_modules()
    except (NotImplementedError, AttributeError):
        return False
    return any(m is module for top in modules.values() for m in top.modules())


class FeatureReader:
    """Reads one stage of a frozen backbone for the alignment head, next to the base detector's scoring.

    When the base exposes its frozen ``backbone_`` (an ``omniad.backbone.Backbone``) with the wanted stage and
    saves it in its bundle, the reader taps that backbone with a forward hook while the base scores, so the
    backbone runs once per image for both (it falls back to an explicit forward when the base did not call its
    backbone on exactly the given batch). Otherwise the reader runs ``own`` (a Backbone the wrapper built).

    Args:
        backbone: the frozen Backbone to read.
        index: position of the wanted stage in the backbone's outputs.
        shared: whether ``backbone`` is the base's own (tapped) or the wrapper's.
        size: average-pool larger feature maps to at most ``size`` x ``size`` (None: keep them as they are).
    """

    def __init__(self, backbone: Backbone, index: int, shared: bool, size: int | None = None) -> None:
        self.backbone = backbone
        self.index = index
        self.shared = shared
        self.size = size

    def _pool(self, features: Tensor) -> Tensor:
        if self.size is None:
            return features
        h, w = (int(n) for n in features.shape[-2:])  # plain ints also while traced for export (fixed sizes)
        target = (min(h, self.size), min(w, self.size))
        return features if (h, w) == target else area_resize(features, target)

    @property
    def backbone_device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def stage(self) -> int:
        return self.backbone.stages[self.index]

    @property
    def channels(self) -> int:
        return self.backbone.channels[self.index]

    @torch.no_grad()
    def base_and_features(self, base: BaseDetector, images: Tensor) -> tuple[AnomalyScores, Tensor]:
        """The base's scores of ``images`` (on its device) and the frozen features of the wanted stage. A base
        with its own geometry (``own_geometry``) scores the images as read, its maps stitched or cropped to their
        content; the features are then those of the whole image as the base's network takes an untiled one
        (its ``preprocess``: squashed to the tiles' side, or letterboxed)."""
        if own_geometry(base):
            view = base.preprocess(images).to(self.backbone_device)
            return base.score(images), self._pool(self.backbone(view)[self.index])
        captured: list[Tensor] = []
        handle = None
        if self.shared:

            def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
                if not captured and inputs and inputs[0] is images:
                    captured.append(output[self.index])

            handle = self.backbone.register_forward_hook(hook)
        try:
            result = base.score_batch(images)
        finally:
            if handle is not None:
                handle.remove()
        features = captured[0] if captured else self.backbone(images)[self.index]
        return result, self._pool(features)

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """The (pooled) features of the wanted stage alone."""
        return self._pool(self.backbone(images)[self.index])


def make_feature_reader(
    base: BaseDetector,
    stage: int | None,
    own: Callable[[int], Backbone],
    default_stage: int = 3,
    size: int | None = None,
) -> FeatureReader:
    """Choose where the head's features come from: the base's backbone if it has the stage, else ``own(stage)``.

    Args:
        base: the fitted (or rebuilt) base detector.
        stage: wanted backbone stage (timm feature index); None = the deepest stage of the base's backbone,
            or ``default_stage`` of an own backbone.
        own: builds the wrapper's own frozen Backbone for a stage.
        default_stage: stage of the own backbone when ``stage`` is None.
        size: largest spatial size of the features handed to the head (see ``FeatureReader``).
    """
    backbone = getattr(base, "backbone_", None)
    if isinstance(backbone, Backbone) and _saved_with_base(base, backbone):
        if stage is None:
            index = max(range(len(backbone.stages)), key=lambda i: (backbone.strides[i], backbone.stages[i]))
            return FeatureReader(backbone, index, shared=True, size=size)
        if stage in backbone.stages:
            return FeatureReader(backbone, backbone.stages.index(stage), shared=True, size=size)
    stage = default_stage if stage is None else stage
    return FeatureReader(own(stage), 0, shared=False, size=size)


@dataclass
class AlignmentData:
    """What alignment is trained on, collected once from the base's training images.

    Attributes:
        moments: (N, 3) per-image (mean, max, std) of the base's anomaly maps.
        features: (N, C, h, w) frozen features of the same images (on the CPU).
        stage: the backbone stage the features come from.
    """

    moments: Tensor
    features: Tensor
    stage: int

    def __len__(self) -> int:
        return self.moments.shape[0]


@torch.no_grad()
def collect_alignment_data(
    base: BaseDetector, reader: FeatureReader | None, images: Any, batch_size: int, progress: bool = False
) -> AlignmentData:
    """Score every training image with the fitted base and keep its map statistics and frozen features (none,
    an (N, 0, 1, 1) tensor with stage -1, when ``reader`` is None)."""
    moments, features = [], []
    for batch in iterate_batches(images, batch_size, progress, "alignment targets"):
        batch = batch if own_geometry(base) else batch.to(base.device_)
        if reader is None:
            scores = base.score if own_geometry(base) else base.score_batch
            result, feats = scores(batch), torch.zeros(batch.shape[0], 0, 1, 1)
        else:
            result, feats = reader.base_and_features(base, batch)
        moments.append(map_moments(result.anomaly_maps.float().cpu()))
        features.append(feats.float().cpu())
    if not moments:
        raise ValueError("no training images to compute alignment targets from")
    return AlignmentData(torch.cat(moments), torch.cat(features), -1 if reader is None else reader.stage)


__all__ = [
    "AlignmentData",
    "FeatureReader",
    "PAPER_ALPHA",
    "PAPER_ITERATIONS",
    "build_base",
    "collect_alignment_data",
    "jsonable_params",
    "make_feature_reader",
    "own_geometry",
]
