"""Feature helpers: stage fusion, and the containers ``BaseDetector.extract`` caches (a tensor or a list of
tensors per image set: the frozen backbone runs once per training image and training loops over the cache)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def fuse_stages(features: Sequence[Tensor], size: tuple[int, int] | None = None, mode: str = "bilinear") -> Tensor:
    """Resize every stage map to one grid (default: the first stage's) and concatenate along channels.

    Args:
        features: (B, C_i, h_i, w_i) stage maps.
        size: target (h, w); defaults to the first map's size.
        mode: interpolation mode ("bilinear" up-samples coarse stages, "area" pools fine ones).

    Returns:
        (B, sum C_i, h, w).
    """
    import torch.nn.functional as F

    size = tuple(features[0].shape[-2:]) if size is None else tuple(size)
    resized = []
    for f in features:
        if tuple(f.shape[-2:]) != size:
            if mode == "area":
                f = area_resize(f, size)
            else:
                kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
                f = F.interpolate(f, size=size, mode=mode, **kwargs)
        resized.append(f)
    return torch.cat(resized, dim=1)


def area_resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """``F.interpolate(x, size, mode="area")`` (an adaptive average pool) of (B, C, h, w) maps.

    While traced for export (``omniad.export``) an integer ratio takes an equivalent path the ONNX exporter can
    convert without knowing the input's size: a ``k`` x ``k`` average pool down, nearest-neighbour repetition up
    (which is what the adaptive pool computes for integer ratios).
    """
    import torch.nn.functional as F

    from omniad.runtime import is_exporting

    if is_exporting():
        (h, w), (oh, ow) = (int(n) for n in x.shape[-2:]), (int(size[0]), int(size[1]))
        if h % oh == 0 and w % ow == 0:
            return F.avg_pool2d(x, (h // oh, w // ow)) if (h, w) != (oh, ow) else x
        if oh % h == 0 and ow % w == 0:
            return F.interpolate(x, size=(oh, ow), mode="nearest")
    return F.interpolate(x, size=tuple(size), mode="area")


# A method's features are a tensor or a list of tensors whose first dimension is the image; these helpers let the
# base batch, move and join them without knowing which.
Features = Tensor | list[Tensor]


def feature_count(features: Features) -> int:
    """Number of images the features belong to."""
    return features.shape[0] if isinstance(features, Tensor) else features[0].shape[0]


def feature_slice(features: Features, start: int, stop: int) -> Features:
    """The features of images ``start:stop``."""
    if isinstance(features, Tensor):
        return features[start:stop]
    return [f[start:stop] for f in features]


def feature_to(features: Features, device: torch.device | str, dtype: torch.dtype | None = None) -> Features:
    """The features on ``device`` (floating tensors cast to ``dtype`` when given)."""

    def move(t: Tensor) -> Tensor:
        return t.to(device, dtype) if dtype is not None and t.is_floating_point() else t.to(device)

    return move(features) if isinstance(features, Tensor) else [move(f) for f in features]


class FeatureCache:
    """The features of ``n`` images, written batch by batch into storage allocated once from the first batch's
    shapes (``omniad.memory.allocate``: in memory within the budget, memory-mapped on disk above it), so a
    cache never needs twice its size as joining per-batch parts would."""

    def __init__(self, n: int) -> None:
        self.n, self.filled, self.storage = n, 0, None

    def write(self, part: Features) -> None:
        from omniad.memory import allocate

        tensors = [part] if isinstance(part, Tensor) else list(part)
        if self.storage is None:
            self.storage = [allocate((self.n, *t.shape[1:]), t.dtype) for t in tensors]
            self.single = isinstance(part, Tensor)
        rows = tensors[0].shape[0]
        if self.filled + rows > self.n:
            raise ValueError(f"feature cache of {self.n} images got {self.filled + rows}")
        for store, t in zip(self.storage, tensors, strict=True):
            store[self.filled : self.filled + rows] = t
        self.filled += rows

    def result(self) -> Features:
        """The cache: one tensor, or a list of tensors, with the images written so far."""
        if self.storage is None:
            raise ValueError("the feature cache holds no images")
        parts = [store[: self.filled] for store in self.storage]
        return parts[0] if self.single else parts


def feature_cat(parts: list[Features]) -> Features:
    """Join per-batch features along the image dimension."""
    if isinstance(parts[0], Tensor):
        return torch.cat(parts)
    return [torch.cat(group) for group in zip(*parts)]
