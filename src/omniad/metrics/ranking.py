"""Threshold-free ranking metrics: AUROC, average precision and F1-max, exact and fast enough for pixels.

Every function takes binary ``labels`` (1 = anomalous) and ``scores`` (higher = more anomalous) of any shape
(numpy arrays or torch tensors; they are flattened) and returns a float. When only one class is present the
metric is undefined and the functions return ``nan`` (no exception, no warning): a category without defects,
or without pixel ground truth, simply has no value, and reports print it as "n/a".

The results equal scikit-learn's ``roc_auc_score``, ``average_precision_score`` and the maximum over
``precision_recall_curve`` of 2PR / (P + R), ties included, but they are computed differently so that 65
million pixel scores fit in memory and take seconds: the positive and the negative scores are sorted
separately (values only, no index array) and every quantity is read off with ``searchsorted``:

- AUROC is the Mann-Whitney statistic P(s+ > s-) + P(s+ = s-) / 2, which is exactly the trapezoidal area under
  scikit-learn's ROC curve (ties are diagonal segments there, half credit here).
- Recall changes only at thresholds equal to a positive score, so average precision
  (sum of (R_k - R_{k-1}) P_k over thresholds) only needs those thresholds; so does F1-max, since between two
  positive scores lowering the threshold adds false positives and nothing else.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np


class SplitScores(NamedTuple):
    """The scores of positives and of negatives, each sorted ascending."""

    positives: np.ndarray
    negatives: np.ndarray


def as_numpy(values: Any, name: str) -> np.ndarray:
    """A flat numpy view of an array or tensor (no copy for contiguous CPU inputs)."""
    if hasattr(values, "detach"):  # torch tensor
        values = values.detach().cpu().numpy()
    return np.asarray(values).reshape(-1)


def split_sorted(labels: Any, scores: Any) -> SplitScores:
    """Check the inputs and sort the scores of positives and negatives separately.

    Args:
        labels: binary ground truth (bool or 0/1), any shape.
        scores: anomaly scores of the same number of elements; float32 stays float32 (pixel maps).

    Raises:
        ValueError: on mismatched sizes, labels other than 0/1, or non-finite scores.
    """
    y = as_numpy(labels, "labels")
    s = as_numpy(scores, "scores")
    if y.size != s.size:
        raise ValueError(f"labels and scores differ in size: {y.size} vs {s.size}")
    if y.dtype != np.bool_:
        if y.size and not np.isin(np.unique(y), (0, 1)).all():
            raise ValueError(f"labels must be 0/1 or boolean, got values {np.unique(y)[:5]}")
        y = y.astype(bool)
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    pos = s[y]  # boolean indexing copies: the caller's array is never modified
    neg = s[~y]
    pos.sort()
    neg.sort()
    return SplitScores(pos, neg)


def _positive_thresholds(split: SplitScores) -> tuple[np.ndarray, np.ndarray]:
    """True and false positives when flagging ``score >= v``, for each distinct positive score v (desc.)."""
    pos, neg = split
    values = np.unique(pos)[::-1]
    tps = pos.size - np.searchsorted(pos, values, side="left")
    fps = neg.size - np.searchsorted(neg, values, side="left")
    return tps.astype(np.float64), fps.astype(np.float64)


def auroc_sorted(split: SplitScores) -> float:
    """AUROC from ``split_sorted`` output (nan when one class is missing)."""
    pos, neg = split
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    values, counts = np.unique(pos, return_counts=True)
    below = np.searchsorted(neg, values, side="left")
    equal = np.searchsorted(neg, values, side="right") - below
    wins = np.dot(counts.astype(np.float64), below + 0.5 * equal)
    return float(wins / (float(pos.size) * float(neg.size)))


def average_precision_sorted(split: SplitScores) -> float:
    """Average precision (scikit-learn's, non-interpolated) from ``split_sorted`` output."""
    pos, neg = split
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    tps, fps = _positive_thresholds(split)
    recall_steps = np.diff(tps, prepend=0.0) / pos.size
    return float(np.sum(recall_steps * tps / (tps + fps)))


def f1_max_sorted(split: SplitScores) -> float:
    """Best F1 over all thresholds from ``split_sorted`` output."""
    pos, neg = split
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    tps, fps = _positive_thresholds(split)
    # F1 = 2PR / (P + R) = 2 TP / (TP + FP + #positives)
    return float(np.max(2.0 * tps / (tps + fps + pos.size)))


def ranking_metrics(labels: Any, scores: Any) -> dict[str, float]:
    """AUROC, AP and F1-max with a single sort: ``{"auroc", "ap", "f1max"}``."""
    split = split_sorted(labels, scores)
    return {
        "auroc": auroc_sorted(split),
        "ap": average_precision_sorted(split),
        "f1max": f1_max_sorted(split),
    }


def auroc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve; equals ``sklearn.metrics.roc_auc_score``. nan when one class is missing."""
    return auroc_sorted(split_sorted(labels, scores))


def average_precision(labels: Any, scores: Any) -> float:
    """Average precision; equals ``sklearn.metrics.average_precision_score``. nan if one class is missing."""
    return average_precision_sorted(split_sorted(labels, scores))


def f1_max(labels: Any, scores: Any) -> float:
    """Maximum F1 over thresholds of scikit-learn's ``precision_recall_curve``; nan if a class is absent."""
    return f1_max_sorted(split_sorted(labels, scores))


# The protocol's names (docs/evaluation.md): image level takes (N,) scores, pixel level (N, H, W) masks and maps.
image_auroc = auroc
image_ap = average_precision
image_f1max = f1_max


def pixel_auroc(masks: Any, maps: Any) -> float:
    """Pixel AUROC over all pixels of all maps pooled."""
    return auroc(masks, maps)


def pixel_ap(masks: Any, maps: Any) -> float:
    """Pixel AP over all pixels of all maps pooled."""
    return average_precision(masks, maps)


def pixel_f1max(masks: Any, maps: Any) -> float:
    """Pixel F1-max over all pixels of all maps pooled."""
    return f1_max(masks, maps)
