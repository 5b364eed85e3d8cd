"""Decision thresholds from normal images only: what a line operator can calibrate without any defects.

``Calibration`` is the one value that carries a detector's decision rule: the threshold, the false-alarm rate it
aims at, the normal scores it was set on (so it can be re-set honestly at another rate) and where those came
from. It is computed by ``Calibration.from_normal_scores`` alone, saved and restored with the model by
``omniad.io``, and applied by ``Calibration.decide`` alone (``evaluate``, ``predict`` and the CLI all call it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def threshold_at_far(normal_scores: np.ndarray, target_far: float) -> float:
    """The smallest threshold at which at most ``target_far`` of these normal scores lie strictly above it.

    A score is flagged anomalous when ``score > threshold``.
    """
    if not 0.0 <= target_far < 1.0:
        raise ValueError(f"target_far must be in [0, 1), got {target_far}")
    scores = np.sort(np.asarray(normal_scores, dtype=np.float64).ravel())
    if scores.size == 0:
        raise ValueError("cannot calibrate a threshold on an empty set of normal scores")
    if not np.isfinite(scores).all():
        raise ValueError(f"cannot calibrate on non-finite scores ({int((~np.isfinite(scores)).sum())} NaN or inf)")
    # how many normals may be flagged; rounded first because 0.29 * 100 is 28.999999999999996 in floats
    allowed = math.floor(round(target_far * scores.size, 6))
    return float(scores[scores.size - 1 - allowed])


@dataclass(frozen=True)
class Calibration:
    """A decision threshold set on normal images only.

    Attributes:
        threshold: an image is flagged anomalous when its score is strictly above this.
        target_far: the share of the normal images that the threshold flags at most.
        normal_scores: the normal images' scores the threshold was set on (float64, sorted).
        source: where those images came from (e.g. "held-out 10% of the training images").
        normal_groups: the cluster of the training images each normal image was drawn from (``omniad.holdout``),
            in the order of ``normal_scores``; None when they were not drawn by cluster.
    """

    threshold: float
    target_far: float
    normal_scores: np.ndarray = field(repr=False)
    source: str = ""
    normal_groups: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def from_normal_scores(cls, scores: Any, target_far: float, source: str, groups: Any = None) -> Calibration:
        """The threshold at ``target_far`` on these normal scores: the one place a threshold is computed.
        ``groups``: each image's cluster (same order as ``scores``), kept for ``group_rates``."""
        raw = np.asarray(_numpy(scores), dtype=np.float64).ravel()
        order = np.argsort(raw, kind="stable")
        sorted_groups = None
        if groups is not None:
            labels = np.asarray(_numpy(groups)).ravel()
            if labels.shape != raw.shape:
                raise ValueError(f"{labels.size} groups given for {raw.size} normal scores")
            sorted_groups = labels.astype(np.int64)[order]
        return cls(threshold_at_far(raw[order], target_far), float(target_far), raw[order], source, sorted_groups)

    def at(self, target_far: float) -> Calibration:
        """The same normal scores calibrated at another false-alarm rate (no images needed)."""
        return Calibration.from_normal_scores(self.normal_scores, target_far, self.source, self.normal_groups)

    def group_rates(self, threshold: float | None = None) -> list[dict[str, Any]]:
        """Per cluster of the held-out normals: images, how many score above ``threshold`` (default: its own)
        and that share. Empty when the normals were not drawn by cluster. A threshold that holds on average can
        flag one kind of image far more often than another: this says which."""
        if self.normal_groups is None:
            return []
        thr = self.threshold if threshold is None else float(threshold)
        rows = []
        for group in np.unique(self.normal_groups):
            scores = self.normal_scores[self.normal_groups == group]
            flagged = int((scores > thr).sum())
            rows.append({"group": int(group), "images": int(scores.size), "flagged": flagged,
                         "rate": flagged / scores.size})
        return rows

    def decide(self, image_scores: Any) -> np.ndarray:
        """Boolean decisions ``score > threshold``; NaN or infinite scores are an error, never a decision."""
        scores = np.asarray(_numpy(image_scores), dtype=np.float64)
        bad = ~np.isfinite(scores)
        if bad.any():
            raise ValueError(
                f"{int(bad.sum())} of {scores.size} image scores are NaN or infinite (first at position "
                f"{int(np.flatnonzero(bad.ravel())[0])}): no decision can be made on them"
            )
        return scores > self.threshold

    def false_alarm_rate(self, threshold: float | None = None) -> float:
        """Share of the calibration's normal images scoring above ``threshold`` (default: its own)."""
        thr = self.threshold if threshold is None else float(threshold)
        return float(np.mean(self.normal_scores > thr))

    def describe(self) -> str:
        """One line for reports and the CLI."""
        return (
            f"threshold {self.threshold:.6g} at target false-alarm rate {self.target_far:g}, set on "
            f"{self.normal_scores.size} normal images ({self.source})"
        )

    def describe_groups(self) -> str:
        """One line: the held-out normals' false alarms per cluster of the training images ("" without them)."""
        rows = self.group_rates()
        if not rows:
            return ""
        return "held-out normals flagged, per cluster of the training images: " + format_group_rates(rows)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (the normal scores as a list)."""
        return {
            "threshold": self.threshold,
            "target_far": self.target_far,
            "normal_scores": self.normal_scores.tolist(),
            "source": self.source,
            "normal_groups": None if self.normal_groups is None else self.normal_groups.tolist(),
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "calibration") -> Calibration:
        """Inverse of ``to_dict``, checked: a tampered value is a ``ValueError`` naming ``where``."""
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
        threshold, far, scores = data.get("threshold"), data.get("target_far"), data.get("normal_scores")
        for name, value in (("threshold", threshold), ("target_far", far)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{where}: {name} must be a finite number, got {value!r}")
        if not 0.0 <= far < 1.0:
            raise ValueError(f"{where}: target_far must be in [0, 1), got {far}")
        if not isinstance(scores, list) or not scores:
            raise ValueError(f"{where}: normal_scores must be a non-empty list of numbers")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores):
            raise ValueError(f"{where}: normal_scores must hold numbers only")
        values = np.sort(np.asarray(scores, dtype=np.float64))
        if not np.isfinite(values).all():
            raise ValueError(f"{where}: normal_scores holds NaN or infinite values")
        computed = threshold_at_far(values, float(far))
        if not math.isclose(computed, float(threshold), rel_tol=1e-9, abs_tol=1e-12):
            raise ValueError(
                f"{where}: threshold {threshold} does not follow from its normal scores at target_far {far} "
                f"(they give {computed}); the file was edited or corrupted"
            )
        groups = data.get("normal_groups")
        if groups is not None:
            if (not isinstance(groups, list) or len(groups) != len(scores)
                    or not all(isinstance(g, int) and not isinstance(g, bool) for g in groups)):
                raise ValueError(f"{where}: normal_groups must be a list of {len(scores)} integers, one per score")
            # stored in the order of the sorted scores; a stable sort of sorted values keeps that order
            groups = np.asarray(groups, dtype=np.int64)[np.argsort(np.asarray(scores, dtype=np.float64),
                                                                    kind="stable")]
        return cls(float(threshold), float(far), values, str(data.get("source", "")), groups)


def format_group_rates(rows: list[dict[str, Any]]) -> str:
    """``Calibration.group_rates`` rows as "#0: 0 of 12, #1: 2 of 9 (22%)"."""
    return ", ".join(f"#{r['group']}: {r['flagged']} of {r['images']}" + (f" ({r['rate']:.0%})" if r["flagged"] else "")
                     for r in rows)


def _numpy(values: Any) -> Any:
    return values.detach().cpu().numpy() if hasattr(values, "detach") else values


__all__ = ["Calibration", "format_group_rates", "threshold_at_far"]
