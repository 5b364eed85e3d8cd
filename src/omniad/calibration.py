"""Decision thresholds from normal images only: what a line operator can calibrate without any defects."""

from __future__ import annotations

import math

import numpy as np


def threshold_at_far(normal_scores: np.ndarray, target_far: float) -> float:
    """The smallest threshold at which at most ``target_far`` of these normal scores lie strictly above it.

    A score is flagged anomalous when ``score > threshold``.
    """
    if not 0.0 <= target_far < 1.0:
        raise ValueError(f"target_far must be in [0, 1), got {target_far}")
    scores = np.sort(np.asarray(normal_scores, dtype=np.float64).ravel())
    if scores.size == 0:
        return float("nan")
    # how many normals may be flagged; rounded first because 0.29 * 100 is 28.999999999999996 in floats
    allowed = math.floor(round(target_far * scores.size, 6))
    return float(scores[scores.size - 1 - allowed])
