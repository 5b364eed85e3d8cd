"""AU-PRO: area under the per-region-overlap curve up to a false-positive rate (MVTec AD localisation metric).

Definition (Bergmann et al., MVTec AD, IJCV 2021, and its reference evaluation code): the defect pixels of
each mask are split into connected regions (8-connectivity). At a threshold t a pixel is flagged when its
score is >= t, and

    PRO(t) = mean over all regions r of  |flagged pixels of r| / |r|
    FPR(t) = |flagged normal pixels| / |normal pixels|   (normal pixels of all images, defective included)

The (FPR, PRO) points of every distinct score, with (0, 0) and (1, 1) added, form a curve; its trapezoidal
area from FPR 0 to ``fpr_limit`` (linearly interpolated at the limit), divided by ``fpr_limit``, is AU-PRO.

Computed exactly without looping over thresholds: PRO(t) is a weighted count (each defect pixel weighs
1 / |its region|, the weights summing to the number of regions), so one sort of the defect pixels plus a
cumulative sum gives PRO at any threshold by ``searchsorted``. FPR only moves at scores of normal pixels, so
the curve's area is a sum of one trapezoid per distinct normal score u, from (FPR(>u), PRO(>u)) to
(FPR(>=u), PRO(>=u)); the vertical steps between them (thresholds held by defect pixels only) have no area.
Only the normal scores in the top ``fpr_limit`` share are ever needed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from omniad.metrics.ranking import (
    SplitScores,
    auroc_sorted,
    average_precision_sorted,
    f1_max_sorted,
)

# Connect pixels within one image in 8-connectivity, never across images of the stack.
_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE[1] = True


def _as_stack(values: Any, name: str) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ValueError(f"{name} must be (H, W) or (N, H, W), got shape {array.shape}")
    return array


def _pixels(masks: Any, maps: Any) -> tuple[np.ndarray, int, np.ndarray, np.ndarray]:
    """(region of each defect pixel, number of regions, defect pixels' scores, normal pixels' scores) of a stack
    of masks and maps, or of lists of them with one size per image (maps stitched at each image's own size)."""
    if isinstance(masks, (list, tuple)) and isinstance(maps, (list, tuple)):
        if len(masks) != len(maps):
            raise ValueError(f"{len(masks)} masks but {len(maps)} maps")
        parts = [_pixels(mask, image_map) for mask, image_map in zip(masks, maps, strict=True)]
        offsets = np.cumsum([0] + [part[1] for part in parts[:-1]])
        regions = np.concatenate([part[0] + offset for part, offset in zip(parts, offsets, strict=True)])
        return (regions, int(sum(part[1] for part in parts)), np.concatenate([part[2] for part in parts]),
                np.concatenate([part[3] for part in parts]))
    masks = _as_stack(masks, "masks")
    maps = _as_stack(maps, "maps")
    if masks.shape != maps.shape:
        raise ValueError(f"masks and maps differ in shape: {masks.shape} vs {maps.shape}")
    if masks.dtype != np.bool_:
        masks = masks > 0.5
    if not np.issubdtype(maps.dtype, np.floating):
        maps = maps.astype(np.float64)
    labeled, n_regions = ndimage.label(masks, structure=_STRUCTURE)
    return labeled[masks], n_regions, maps[masks], maps[~masks]


class _PixelSplit:
    """Defect pixels with their region weights (1 / region size), and normal pixels sorted by score."""

    def __init__(self, masks: Any, maps: Any) -> None:
        region_of_pixel, self.n_regions, self.defect_scores, self.negatives = _pixels(masks, maps)
        # region ids start at 1 (0 is background): 1 / size of the pixel's region
        self.weights = 1.0 / np.bincount(region_of_pixel)[region_of_pixel]
        del region_of_pixel
        self.positives = np.sort(self.defect_scores)
        self.negatives.sort()
        # NaN sorts last and infinities sit at the ends: checking the ends checks every value in no extra pass
        ends = [a[i] for a in (self.positives, self.negatives) if a.size for i in (0, -1)]
        if not np.isfinite(ends).all():
            raise ValueError("anomaly maps contain NaN or infinite values")

    @property
    def split(self) -> SplitScores:
        return SplitScores(self.positives, self.negatives)

    def aupro(self, fpr_limit: float) -> float:
        if not 0.0 < fpr_limit <= 1.0:
            raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
        neg = self.negatives
        n_neg = neg.size
        if n_neg == 0 or self.n_regions == 0:
            return float("nan")
        # Normal scores u with FPR(>u) < fpr_limit all lie in the top ceil(limit * n) + 1 sorted negatives.
        start = max(0, n_neg - int(np.ceil(fpr_limit * n_neg)) - 1)
        tail = neg[start:]
        run_starts = np.flatnonzero(tail[1:] != tail[:-1]) + 1  # where each distinct value u begins
        first = np.concatenate(([0], run_starts)) + start
        first[0] = np.searchsorted(neg, tail[0], side="left")  # the lowest value may begin before ``start``
        stop = np.concatenate((run_starts + start, [n_neg]))
        values = neg[first]
        del run_starts
        # PRO(> u) and PRO(>= u), times n_regions: weight of the defect pixels above each u, by their place
        m = values.size
        below = np.searchsorted(values, self.defect_scores, side="left")  # s > u_j  <=>  j < below
        upto = np.searchsorted(values, self.defect_scores, side="right")  # s >= u_j <=>  j < upto
        cum_below = np.cumsum(np.bincount(below, self.weights, minlength=m + 1))
        cum_upto = np.cumsum(np.bincount(upto, self.weights, minlength=m + 1))
        del below, upto
        # u's segment runs from FPR(> u) = (n - stop) / n to FPR(>= u) = (n - first) / n. Whole segments
        # (FPR(>= u) within the limit) add count / n * (PRO(> u) + PRO(>= u)) / 2; the one crossing the limit
        # is cut there, PRO interpolated linearly (as MVTec's trapezoid_area).
        limit_count = fpr_limit * n_neg
        whole = np.searchsorted(first, n_neg - limit_count, side="left")  # first index with FPR(>=u) <= limit
        counts = (stop[whole:] - first[whole:]).astype(np.float64)
        heights = (cum_below[-1] - cum_below[whole:m]) + (cum_upto[-1] - cum_upto[whole:m])
        area = float(np.dot(counts, heights)) / 2.0
        j = whole - 1
        if j >= 0 and n_neg - stop[j] < limit_count:  # the crossing segment
            width = limit_count - (n_neg - stop[j])
            p0 = cum_below[-1] - cum_below[j]
            p1 = cum_upto[-1] - cum_upto[j]
            y_end = p0 + (p1 - p0) * width / (stop[j] - first[j])
            area += width * (p0 + y_end) / 2.0
        return float(area / (n_neg * self.n_regions * fpr_limit))


def aupro(masks: Any, maps: Any, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit``.

    Args:
        masks: (N, H, W) or (H, W) ground truth, bool or 0/1 (values > 0.5 count as defect), or a list of
            (H_i, W_i) masks of images of different sizes.
        maps: anomaly maps of the same shape (or a list like ``masks``), higher = more anomalous.
        fpr_limit: upper end of the false-positive-rate integration range (0.3 in MVTec AD's protocol).

    Returns:
        AU-PRO in [0, 1]; nan when there is no defect region or no normal pixel.
    """
    return _PixelSplit(masks, maps).aupro(fpr_limit)


def pixel_metrics(masks: Any, maps: Any, fpr_limit: float = 0.3) -> dict[str, float]:
    """Pixel AUROC, AP, F1-max and AU-PRO with one sort: ``{"auroc", "ap", "f1max", "aupro"}``.

    All nan when the masks hold no defect pixel (or no normal pixel).
    """
    pixels = _PixelSplit(masks, maps)
    split = pixels.split
    return {
        "auroc": auroc_sorted(split),
        "ap": average_precision_sorted(split),
        "f1max": f1_max_sorted(split),
        "aupro": pixels.aupro(fpr_limit),
    }
