"""Decision thresholds from normal images only: what a line operator can calibrate without any defects."""

from __future__ import annotations

import math

import numpy as np


def threshold_at_far(normal_scores: np.ndarray, target_far: float) -> float:
    """The smallest threshold at which at most ``target_far`` of these normal scores lie strictly above it.

    A score is flagged anomalous when ``score > threshold``.
    """
    scores = np.sort(np.asarray(normal_scores, dtype=np.float64).ravel())
    if scores.size == 0:
        return float("nan")
    if not 0.0 <= target_far < 1.0:
        raise ValueError(f"target_far must be in [0, 1), got {target_far}")
    allowed = int(math.floor(target_far * scores.size))  # how many normals may be flagged
    return float(scores[scores.size - 1 - allowed])
