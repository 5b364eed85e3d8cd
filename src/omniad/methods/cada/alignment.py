"""The statistics CADA aligns with and the alignment itself (CADA, ECCV 2024, Eqs. 1 and 5): pure tensor maths.

An anomaly map of an image whose normal-score distribution has mean ``u`` and "maximum" ``gamma`` is mapped by
``(map - u) / (gamma - u)``, so that the normal pixels of every product type land on one scale (mean 0, max 1)
and one threshold serves all of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

TARGETS = ("max", "u_sigma")


def map_moments(maps: Tensor) -> Tensor:
    """Per-image (mean, max, std) of (B, H, W) anomaly maps, as a (B, 3) float64 tensor.

    Every statistic CADA and its class-aware variants need can be computed from these three numbers per image,
    so the training maps themselves never have to be kept in memory.
    """
    flat = maps.flatten(1).double()
    return torch.stack([flat.mean(1), flat.max(1).values, flat.std(1, unbiased=False)], dim=1)


def targets_from_moments(moments: Tensor, target: str = "max") -> Tensor:
    """Per-image (u, gamma) from ``map_moments``: the regression targets of CADA (Sec. 3.3, Eq. 3).

    Args:
        moments: (B, 3) per-image (mean, max, std).
        target: "max": gamma = the map's maximum (the paper's default); "u_sigma": gamma = u + 3 sigma of the
            map (Sec. 4.4, Table 5: more robust when the training set holds a few anomalous images).

    Returns:
        (B, 2) float32 tensor of (u, gamma).
    """
    _check_target(target)
    u = moments[:, 0]
    gamma = moments[:, 1] if target == "max" else u + 3.0 * moments[:, 2]
    return torch.stack([u, gamma], dim=1).float()


def image_statistics(maps: Tensor, target: str = "max") -> Tensor:
    """Per-image (u, gamma) of (B, H, W) anomaly maps; see ``targets_from_moments``."""
    return targets_from_moments(map_moments(maps), target)


def class_statistics(moments: Tensor, categories: Sequence[str], target: str = "max") -> dict[str, tuple[float, float]]:
    """Per-class (u_c, gamma_c) of the training maps, as class-aware alignment uses them (Sec. 3.2).

    u_c is the mean of every pixel score of the class's images (maps of one size: the mean of the per-image
    means); gamma_c is the mean of the per-image maxima ("to avoid outliers", as the paper does in practice), or
    u_c + 3 sigma_c with sigma_c the standard deviation over all of the class's pixels for ``target="u_sigma"``.

    Args:
        moments: (N, 3) per-image (mean, max, std) from ``map_moments``.
        categories: N class names, one per image.
        target: "max" or "u_sigma".
    """
    _check_target(target)
    if len(categories) != moments.shape[0]:
        raise ValueError(f"got statistics of {moments.shape[0]} maps but {len(categories)} categories")
    out: dict[str, tuple[float, float]] = {}
    moments = moments.double()
    for name in sorted(set(categories)):
        rows = moments[[i for i, c in enumerate(categories) if c == name]]
        u = rows[:, 0].mean()
        if target == "max":
            gamma = rows[:, 1].mean()
        else:  # pooled variance = mean within-image variance + variance of the image means
            gamma = u + 3.0 * (rows[:, 2].square() + (rows[:, 0] - u).square()).mean().sqrt()
        out[name] = (float(u), float(gamma))
    return out


def align_maps(maps: Tensor, u: Tensor, gamma: Tensor, min_spread: float = 0.0) -> Tensor:
    """Mean-max normalisation ``(map - u) / (gamma - u)`` with per-image statistics (Eqs. 1 and 5).

    Args:
        maps: (B, H, W) anomaly maps.
        u: (B,) predicted (or class) mean of the normal scores.
        gamma: (B,) predicted (or class) maximum of the normal scores.
        min_spread: lower bound on ``gamma - u``: a regressor may predict gamma <= u for an image far from
            anything it was trained on, which would flip or explode the map; the spread is clamped instead.

    Returns:
        (B, H, W) aligned maps.
    """
    return align_with_spread(maps, u, gamma - u, min_spread)


def align_with_spread(maps: Tensor, u: Tensor, spread: Tensor, min_spread: float = 0.0) -> Tensor:
    """``(map - u) / spread`` with ``spread = gamma - u`` given directly (no cancellation when gamma ~ u)."""
    spread = spread.clamp_min(min_spread) if min_spread > 0 else spread
    return (maps - u.view(-1, 1, 1)) / spread.view(-1, 1, 1)


def _check_target(target: str) -> None:
    if target not in TARGETS:
        raise ValueError(f"unknown CADA target {target!r}; use one of {', '.join(TARGETS)}")


__all__ = [
    "TARGETS",
    "align_maps",
    "align_with_spread",
    "class_statistics",
    "image_statistics",
    "map_moments",
    "targets_from_moments",
]
