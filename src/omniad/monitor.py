"""Does the alarm rate a model sees still match the false-alarm rate it was calibrated at?

A threshold set on held-out normals flags about ``target_far`` of normal images. When the images drift (a new
batch of material, a lamp, a camera, a type the model never saw) the normals' scores move and the alarm rate climbs
far above it, silently: every decision is still "a score above the threshold". ``AlarmMonitor`` counts decisions
and tests the count against the calibration: a count of alarms so high that the calibration makes it less likely
than ``significance`` says the calibration no longer holds (or defects are far more frequent than the line
expects: either way a person should look).

The test is the binomial test against the calibrated rate, widened for the size of the held-out set: a threshold
with a of its n held-out normals above it flags a new normal with probability p ~ Beta(a + 1, n - a) (the order
statistics of n + 1 exchangeable scores), expected (a + 1) / (n + 1), and the alarms among m new normals are then
beta-binomial. With 20 held-out normals a threshold "at 5%" (a = 1) expects 9.5% and varies widely; a plain
binomial test at 5% would call clean images a departure (measured in ``tests/test_monitor.py``: 10 of 60 clean
normals, binomial p = 7e-4). With thousands of held-out normals the two tests agree.

``omniad predict`` checks each run; ``omniad serve`` checks a sliding window of its recent images and exposes the
counts at ``GET /metrics``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import betabinom

from omniad.calibration import Calibration

SIGNIFICANCE = 1e-3  # false warnings: about one check in a thousand on a stream that matches the calibration
MIN_IMAGES = 20  # below this a count says little about a rate of a few percent
WINDOW = 500  # images of the service's sliding window


@dataclass(frozen=True)
class AlarmCheck:
    """One binomial test of an alarm count against the calibrated false-alarm rate.

    Attributes:
        images: images decided.
        alarms: images flagged anomalous among them.
        normals: held-out normal images of the calibration (n).
        normals_above: how many of them score above the threshold (a).
        p_value: P(X >= alarms) for X ~ BetaBinomial(images, a + 1, n - a); 1.0 below ``MIN_IMAGES`` images.
        significance: the p-value below which the rate has departed.
    """

    images: int
    alarms: int
    normals: int
    normals_above: int
    p_value: float
    significance: float = SIGNIFICANCE

    @property
    def expected_rate(self) -> float:
        """The alarm rate the calibration expects on normals: (a + 1) / (n + 1)."""
        return (self.normals_above + 1) / (self.normals + 1)

    @property
    def rate(self) -> float:
        """The share of images flagged (0 with no images)."""
        return self.alarms / self.images if self.images else 0.0

    @property
    def departed(self) -> bool:
        """Whether the alarm rate is significantly above the calibrated one."""
        return self.images >= MIN_IMAGES and self.p_value < self.significance

    def message(self) -> str:
        """One paragraph for people: the counts, the test and what to do."""
        seen = (f"alarm rate {self.rate:.1%} ({self.alarms} of {self.images} images flagged) against the "
                f"{self.expected_rate:.2%} the calibration expects ({self.normals_above} of its {self.normals} "
                "held-out normals flagged)")
        if not self.departed:
            return f"{seen}: consistent with the calibration (p = {self.p_value:.2g})"
        return (f"warning: {seen}: far above it (one-sided test p = {self.p_value:.2g} < "
                f"{self.significance:g}). The images may have shifted from the training normals (a new batch, a "
                "lamp, a camera, a new type), or defects are unusually frequent. Check a sample of the flagged "
                "images; if they are normal, re-set the threshold on current normals (`omniad calibrate --model "
                "M --normals DIR`) or add them to the model (`omniad adapt --model M --normals DIR --out M2`).")

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "alarms": self.alarms, "rate": self.rate,
                "expected_rate": self.expected_rate, "normals": self.normals, "normals_above": self.normals_above,
                "p_value": self.p_value, "significance": self.significance, "departed": self.departed}


def calibration_counts(calibration: Calibration) -> tuple[int, int] | None:
    """(n held-out normals, a of them above the threshold) of a calibration; None when it has no normal scores
    (a bare threshold given by the user)."""
    n = int(calibration.normal_scores.size)
    if n == 0:
        return None
    return n, int((calibration.normal_scores > calibration.threshold).sum())


def check_alarms(images: int, alarms: int, normals: int, normals_above: int,
                 significance: float = SIGNIFICANCE) -> AlarmCheck:
    """The test of ``alarms`` of ``images`` against a threshold with ``normals_above`` of ``normals`` held-out
    normal images above it (see the module docstring)."""
    if images < 0 or not 0 <= alarms <= images:
        raise ValueError(f"alarm counts must satisfy 0 <= alarms <= images, got {alarms} of {images}")
    if normals < 1 or not 0 <= normals_above <= normals:
        raise ValueError(f"calibration counts must satisfy 0 <= above <= normals, got {normals_above} of {normals}")
    if not 0.0 < significance < 1.0:
        raise ValueError(f"significance must be in (0, 1), got {significance}")
    p_value = 1.0
    if images >= MIN_IMAGES and alarms > 0 and normals_above < normals:  # a threshold under every normal: 1
        p_value = float(betabinom.sf(alarms - 1, images, normals_above + 1, normals - normals_above))
    return AlarmCheck(images, alarms, normals, normals_above, p_value, significance)


class AlarmMonitor:
    """Decisions over a sliding window (``window`` images; None = every image), tested after each update.

    Args:
        calibration: the rule the decisions were made with (``Calibration``).
        window: how many of the latest decisions the test covers; a service watches the recent images so that
            a drift is seen while it happens, not diluted by a day of good ones.
        significance: see ``AlarmCheck``.
    """

    def __init__(self, calibration: Calibration, window: int | None = WINDOW,
                 significance: float = SIGNIFICANCE) -> None:
        counts = calibration_counts(calibration)
        if counts is None:
            raise ValueError("the decision rule has no calibrated false-alarm rate to compare alarms with "
                             "(a threshold given without normal scores)")
        if window is not None and window < MIN_IMAGES:
            raise ValueError(f"the monitor's window must hold at least {MIN_IMAGES} images, got {window}")
        self.counts, self.significance = counts, significance
        self._recent: deque[bool] = deque(maxlen=window)
        self.total_images = self.total_alarms = 0

    def update(self, decisions: Any) -> AlarmCheck:
        """Add a batch of decisions (booleans: flagged or not); the test of the window after them."""
        values = np.asarray(decisions, dtype=bool).ravel().tolist()
        self._recent.extend(values)
        self.total_images += len(values)
        self.total_alarms += sum(values)
        return self.check()

    def check(self) -> AlarmCheck:
        """The test of the window as it is."""
        return check_alarms(len(self._recent), sum(self._recent), *self.counts, self.significance)


__all__ = ["AlarmCheck", "AlarmMonitor", "calibration_counts", "check_alarms"]
