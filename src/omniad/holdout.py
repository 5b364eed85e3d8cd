"""Which training images are held out to calibrate the threshold: a share of every kind of image the line has.

A plain random 10% of a line's normals can leave a rare type (or a rare look of one type: another batch, another
lamp) with no held-out image at all, and the threshold then says nothing about it. ``stratified_holdout`` clusters
the training images without labels, by k-means over pooled backbone features of a thumbnail of each image
(``THUMBNAIL`` px: a coarse look is enough to tell a line's kinds of image apart, at 1/16 of a 256 px pass), and
holds out the same share of every cluster (largest remainders; every cluster of two or more images keeps at least
one out when there are enough held-out places). The clusters of the held-out images go with the calibration
(``Calibration.group_rates``), so a fit reports the false-alarm rate of each.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Subset

from omniad.cluster import kmeans, nearest_centres
from omniad.data.sources import holdout_size, iterate_batches

THUMBNAIL = 64  # px of the thumbnail whose pooled features are clustered


@torch.no_grad()
def pooled_features(backbone: Any, images: Dataset, batch_size: int, device: Any, progress: bool = False) -> Tensor:
    """(N, C) global average of the deepest stage ``backbone`` returns, over a ``THUMBNAIL`` px thumbnail of each
    image; without a backbone (a method that has none of its own), the thumbnail's 8 x 8 colour means."""
    rows = []
    for batch in iterate_batches(images, batch_size, progress, "hold-out thumbnails"):
        thumb = F.interpolate(batch.float(), size=(THUMBNAIL, THUMBNAIL), mode="bilinear", antialias=True,
                              align_corners=False)
        if backbone is None:
            rows.append(F.adaptive_avg_pool2d(thumb, 8).flatten(1))
        else:
            rows.append(backbone(thumb.to(device))[-1].float().mean((2, 3)).cpu())
    return torch.cat(rows)


def cluster_labels(features: Tensor, clusters: int, seed: int) -> np.ndarray:
    """(N,) k-means cluster of each row (standardised per dimension first, so no channel's scale dominates)."""
    x = features.double()
    x = ((x - x.mean(0)) / x.std(0).clamp_min(1e-12)).float() if len(x) > 1 else x.float()
    centres = kmeans(x, max(1, min(clusters, len(x))), seed=seed)
    return nearest_centres(x, centres)[1].numpy()


def stratified_indices(labels: np.ndarray, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(kept, held out) indices: round(fraction x N) held out, shared between the clusters in proportion to
    their sizes (largest remainders; a cluster of two or more images keeps one in training and, when there are
    as many places as such clusters, puts at least one out), each cluster's drawn at random (seeded)."""
    n_hold = int(round(fraction * labels.size))
    groups, sizes = np.unique(labels, return_counts=True)
    quota = fraction * sizes
    cap = np.where(sizes >= 2, sizes - 1, 0)  # a cluster is never held out whole
    take = np.minimum(np.floor(quota).astype(int), cap)
    if n_hold >= int((sizes >= 2).sum()):
        take = np.where(sizes >= 2, np.maximum(take, 1), take)
    while take.sum() > n_hold:  # the minimum of one overshot: take back from the most over its quota
        i = int(np.argmax(np.where(take > 1, take - quota, -np.inf)))
        take[i] -= 1
    for limit in (cap, sizes):  # then the largest remainders; past the caps only if nothing else is left
        while take.sum() < n_hold and (take < limit).any():
            i = int(np.argmax(np.where(take < limit, quota - take, -np.inf)))
            take[i] += 1
    rng = np.random.default_rng(seed)
    held: list[int] = []
    for group, count in zip(groups, take, strict=True):
        held += rng.choice(np.flatnonzero(labels == group), size=int(count), replace=False).tolist()
    held_set = set(held)
    return [i for i in range(labels.size) if i not in held_set], sorted(held)


def stratified_holdout(images: Dataset, fraction: float, seed: int, features: Tensor,
                       clusters: int) -> tuple[Dataset, Dataset | None, np.ndarray | None]:
    """(training images, held-out images or None, the held-out images' clusters or None) over ``clusters``
    k-means clusters of ``features`` (one row per image). None when too few images to hold any out."""
    n = len(images)
    n_hold = holdout_size(n, fraction)
    if not n_hold:
        return images, None, None
    if features.shape[0] != n:
        raise ValueError(f"{features.shape[0]} feature rows for {n} images")
    labels = cluster_labels(features, min(clusters, n_hold), seed)
    kept, held = stratified_indices(labels, fraction, seed)
    return Subset(images, kept), Subset(images, held), labels[held]


__all__ = ["THUMBNAIL", "cluster_labels", "pooled_features", "stratified_holdout", "stratified_indices"]
