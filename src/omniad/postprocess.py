"""Tensor helpers shared by the detectors: map resizing, Gaussian smoothing and image-score pooling."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinearly resize (B, h, w) or (B, 1, h, w) maps to (B, H, W)."""
    if maps.dim() == 3:
        maps = maps.unsqueeze(1)
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    return maps[:, 0]


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> Tensor:
    """Normalised 1-D Gaussian with radius ``truncate * sigma`` (scipy's default truncation)."""
    radius = max(1, int(truncate * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def _symmetric_index(n: int, radius: int, device: torch.device) -> Tensor:
    """Source index of each position of a length-``n`` axis padded by ``radius`` on both sides, reflected about
    the edge *including* the edge sample (``d c b a | a b c d | d c b a``): scipy.ndimage's default "reflect"
    mode (numpy's "symmetric"). Periodic, so it works for any ``radius``, even one larger than ``n``."""
    idx = torch.arange(-radius, n + radius, device=device) % (2 * n)
    return torch.where(idx < n, idx, 2 * n - 1 - idx)


def gaussian_blur(maps: Tensor, sigma: float = 4.0) -> Tensor:
    """Separable Gaussian blur of (B, H, W) maps; ``sigma <= 0`` returns the input.

    Matches ``scipy.ndimage.gaussian_filter(map, sigma)`` with its defaults (mode "reflect", truncate 4), which is
    what the reference PatchCore/PaDiM code smooths with. Note that torch's ``F.pad(mode="reflect")`` is scipy's
    "mirror" (edge not repeated), so the borders are gathered by index instead; this also works for maps smaller
    than the kernel.
    """
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel1d(sigma).to(maps.device, maps.dtype)
    radius = kernel.numel() // 2
    h, w = maps.shape[-2:]
    x = maps.unsqueeze(1)
    x = x.index_select(3, _symmetric_index(w, radius, maps.device))
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = x.index_select(2, _symmetric_index(h, radius, maps.device))
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x[:, 0]


def top_fraction_mean(maps: Tensor, fraction: float = 0.01) -> Tensor:
    """Image score = mean of the top ``fraction`` of each map's values (at least one value)."""
    flat = maps.flatten(1)
    # round first: 0.07 * 100 is 7.000000000000001 in floats, whose ceiling would be 8
    # int(): a plain number also while the graph is traced for export (the size is fixed there)
    k = max(1, math.ceil(round(fraction * int(flat.shape[1]), 6)))
    return flat.topk(k, dim=1).values.mean(dim=1)


def max_pooled(maps: Tensor, kernel: int = 16) -> Tensor:
    """Image score = max of the map after ``kernel`` x ``kernel`` average pooling (stride 1), as UniAD does."""
    k = min(kernel, maps.shape[-2], maps.shape[-1])
    pooled = F.avg_pool2d(maps.unsqueeze(1), k, stride=1)
    return pooled.flatten(1).max(dim=1).values


def image_score(maps: Tensor, pooling: str = "top1", fraction: float = 0.01, kernel: int = 16) -> Tensor:
    """Pool (B, H, W) maps to (B,) image scores. ``pooling``: "top1" (protocol default), "max", "maxpool", "mean"
    (the whole map's mean: the image-level discrepancy of semantic novelty detection)."""
    if pooling == "top1":
        return top_fraction_mean(maps, fraction)
    if pooling == "max":
        return maps.flatten(1).max(dim=1).values
    if pooling == "maxpool":
        return max_pooled(maps, kernel)
    if pooling == "mean":
        return maps.flatten(1).mean(dim=1)
    raise ValueError(f"unknown image-score pooling {pooling!r}; use one of {POOLINGS}")


def to_scores(
    raw_maps: Tensor,
    size: tuple[int, int],
    sigma: float,
    pooling: str,
    top_fraction: float = 0.01,
    pool_kernel: int = 16,
    crop: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """The score tail every detector shares: raw (B, h, w) maps -> bilinear up-sampling to ``size`` -> Gaussian
    smoothing -> (B,) image scores pooled from the smoothed (B, H, W) maps. Returns (image scores, maps).
    ``crop`` (h, w): keep only the top-left h x w of the up-sampled maps (the content of a padded input) before
    smoothing and pooling, so that padding never reaches the maps or the scores."""
    rows, cols = map_operators(tuple(raw_maps.shape[-2:]), tuple(size), sigma, crop)
    raw = raw_maps[:, 0] if raw_maps.dim() == 4 else raw_maps
    maps = rows.to(raw.device, raw.dtype) @ raw @ cols.to(raw.device, raw.dtype).T
    return image_score(maps, pooling, fraction=top_fraction, kernel=pool_kernel), maps


def map_operators(raw: tuple[int, int], size: tuple[int, int], sigma: float,
                  crop: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
    """The score tail's map steps (``upsample`` to ``size``, ``crop``, ``gaussian_blur``) as two matrices: each
    step is linear and acts on rows and columns apart, so ``rows @ raw_map @ cols.T`` is the same map (to float
    rounding) for a few thousand multiply-adds per pixel fewer than interpolating and convolving a full-size map:
    measured in an OpenVINO graph of PatchCore (16 images, 256 px), 27 of 166 ms went to those steps.

    Returns (H', h) and (W', w) float32 matrices for (h, w) = ``raw`` maps, (H', W') = the cropped size; cached
    per shape, and built outside any export trace so that a traced graph holds them as constants."""
    return _map_operators(tuple(int(v) for v in raw), tuple(int(v) for v in size), float(sigma),
                          None if crop is None else tuple(int(v) for v in crop))


@functools.lru_cache(maxsize=64)  # a handful of shapes per process; bounded for models read at many crops
def _map_operators(raw: tuple[int, int], size: tuple[int, int], sigma: float,
                   crop: tuple[int, int] | None) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        return tuple(torch.from_numpy(_axis_operator(n, out, keep, sigma).numpy())
                     for n, out, keep in zip(raw, size, crop or size, strict=True))


def _axis_operator(n: int, out: int, keep: int, sigma: float) -> Tensor:
    """(keep, n): one axis of a length-``n`` map up-sampled to ``out`` (bilinear's weights along one axis), cut to
    its first ``keep`` samples and blurred (``gaussian_blur``'s along that axis), applied to each unit impulse."""
    impulses = torch.eye(n, dtype=torch.float32)
    resized = F.interpolate(impulses[None], size=out, mode="linear", align_corners=False)[0] if out != n else impulses
    # a one-row map: the blur across its single row is the identity (a constant reflected), along it the axis's
    blurred = gaussian_blur(resized[:, None, :keep], sigma)[:, 0]
    return blurred.T.contiguous()


POOLINGS = ("top1", "max", "maxpool", "mean")

__all__ = [
    "POOLINGS",
    "gaussian_blur",
    "gaussian_kernel1d",
    "image_score",
    "map_operators",
    "max_pooled",
    "to_scores",
    "top_fraction_mean",
    "upsample",
]
