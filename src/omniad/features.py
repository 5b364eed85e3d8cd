"""Run a frozen backbone once over a dataset and keep what it computes, so that training loops over the cache
instead of re-running the backbone every epoch (what makes training practical on a CPU)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from omniad.data.sources import iterate_batches


@torch.no_grad()
def extract_features(
    backbone: torch.nn.Module,
    data: Any,
    device: torch.device,
    batch_size: int = 16,
    transform: Callable[[list[Tensor]], Tensor | Sequence[Tensor]] | None = None,
    progress: bool = False,
    dtype: torch.dtype = torch.float32,
) -> list[Tensor]:
    """Backbone features of every image, on the CPU.

    Args:
        backbone: frozen module mapping (B, 3, H, W) images to a list of stage maps.
        data: any image source accepted by ``iterate_batches``.
        device: where the backbone runs.
        batch_size: images per forward pass.
        transform: optional per-batch reduction of the stage list (e.g. resize-and-concatenate to one map) so
            that only what the method needs is kept in memory.
        progress: show a progress bar.
        dtype: storage dtype of the cache (float16 halves memory for large sets).

    Returns:
        One tensor per output of ``transform`` (or per stage), each (N, ...).
    """
    backbone = backbone.to(device).eval()
    chunks: list[list[Tensor]] = []
    for images in iterate_batches(data, batch_size, progress, "backbone features"):
        feats = backbone(images.to(device))
        out = transform(feats) if transform is not None else feats
        if isinstance(out, Tensor):
            out = [out]
        chunks.append([o.to("cpu", dtype) for o in out])
    if not chunks:
        raise ValueError("no images to extract features from")
    return [torch.cat(parts) for parts in zip(*chunks)]


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
            kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
            f = F.interpolate(f, size=size, mode=mode, **kwargs)
        resized.append(f)
    return torch.cat(resized, dim=1)


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


def feature_cat(parts: list[Features]) -> Features:
    """Join per-batch features along the image dimension."""
    if isinstance(parts[0], Tensor):
        return torch.cat(parts)
    return [torch.cat(group) for group in zip(*parts)]
