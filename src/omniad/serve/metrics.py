"""What ``omniad serve`` has seen, for people (each ``/predict`` answer carries the alarm monitor's state) and for
Prometheus (``GET /metrics``, the text exposition format, via ``prometheus_client``).

The alarm monitor (``omniad.monitor.AlarmMonitor``) covers the service's latest ``WINDOW`` images and is started
again when the model's calibration changes (a re-calibration while served).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from omniad.monitor import WINDOW, AlarmCheck, AlarmMonitor, calibration_counts

LOG = logging.getLogger("omniad.serve")
# score histogram buckets in units of the calibration: 0 = the median held-out normal score, 1 = the threshold
RELATIVE_BUCKETS = (-1.0, -0.5, 0.0, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)


def score_buckets(calibration: Any) -> tuple[float, ...]:
    """Histogram bounds on the model's own score scale (``RELATIVE_BUCKETS``); Prometheus's defaults without a
    calibration or when the threshold is not above the median normal score."""
    if calibration is None or calibration.normal_scores.size == 0:
        return Histogram.DEFAULT_BUCKETS
    median = float(np.median(calibration.normal_scores))
    spread = float(calibration.threshold) - median
    if not spread > 0:
        return Histogram.DEFAULT_BUCKETS
    return tuple(median + spread * r for r in RELATIVE_BUCKETS) + (float("inf"),)


class ServiceMetrics:
    """Counters of one served model and its alarm monitor (thread-safe)."""

    def __init__(self, detector: Any, window: int = WINDOW) -> None:
        self.detector, self.window = detector, window
        self.registry = CollectorRegistry()
        calibration = getattr(detector, "calibration_", None)
        self.requests = Counter("omniad_requests", "Prediction requests scored", registry=self.registry)
        self.refused = Counter("omniad_requests_refused", "Prediction requests refused (4xx) or failed (5xx)",
                               registry=self.registry)
        self.images = Counter("omniad_images", "Images scored", registry=self.registry)
        self.alarms = Counter("omniad_alarms", "Images flagged anomalous", registry=self.registry)
        self.scores = Histogram("omniad_image_score", "Image scores (buckets: the median held-out normal score "
                                "+ k x (threshold - that median))", buckets=score_buckets(calibration),
                                registry=self.registry)
        gauges = {
            "threshold": "The decision threshold",
            "alarm_rate": f"Share of the latest images (at most {window}) flagged anomalous",
            "alarm_rate_expected": "The alarm rate the calibration expects on normals: (a + 1) / (n + 1) for a of "
                                   "its n held-out normals above the threshold",
            "target_far": "The false-alarm rate the threshold was calibrated at",
            "alarm_window_images": "Images in the alarm monitor's window",
            "alarm_rate_p_value": "One-sided test of the window's alarms against the calibration (omniad.monitor)",
            "alarm_rate_departed": "1 when the window's alarm rate is significantly above the calibrated rate",
        }
        self.gauges = {k: Gauge(f"omniad_{k}", text, registry=self.registry) for k, text in gauges.items()}
        self._lock = threading.Lock()
        self._calibration: Any = None
        self._monitor: AlarmMonitor | None = None
        self._departed = False
        self.served = 0

    def _current_monitor(self) -> AlarmMonitor | None:
        calibration = getattr(self.detector, "calibration_", None)
        if calibration is not self._calibration:  # a new decision rule: the old counts do not test it
            self._calibration = calibration
            usable = calibration is not None and calibration_counts(calibration) is not None
            self._monitor = AlarmMonitor(calibration, self.window) if usable else None
            self._departed = False
            if calibration is not None:
                self.gauges["threshold"].set(float(calibration.threshold))
                self.gauges["target_far"].set(float(calibration.target_far))
        return self._monitor

    def record(self, scores: Any, decisions: list[bool | None]) -> dict[str, Any] | None:
        """Count one scored request. Returns the monitor's check after it (``AlarmCheck.to_dict`` with its
        ``message`` and ``served``, the images this service has scored so far, which orders the answers of
        concurrent requests), or None without a calibrated rate."""
        with self._lock:
            self.served += len(decisions)
            self.requests.inc()
            self.images.inc(len(decisions))
            for value in np.asarray(scores, dtype=np.float64).ravel():
                self.scores.observe(float(value))
            flagged = [d is True for d in decisions]
            self.alarms.inc(sum(flagged))
            monitor = self._current_monitor()
            if monitor is None:
                return None
            check = monitor.update(flagged)
            self._publish(check)
            if check.departed and not self._departed:
                LOG.warning("%s", check.message())
            self._departed = check.departed
            return {**check.to_dict(), "message": check.message(), "served": self.served}

    def status(self) -> AlarmCheck | None:
        with self._lock:
            monitor = self._current_monitor()
            return None if monitor is None else monitor.check()

    def _publish(self, check: AlarmCheck) -> None:
        g = self.gauges
        g["alarm_rate"].set(check.rate)
        g["alarm_rate_expected"].set(check.expected_rate)
        g["alarm_window_images"].set(check.images)
        g["alarm_rate_p_value"].set(check.p_value)
        g["alarm_rate_departed"].set(1.0 if check.departed else 0.0)

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        with self._lock:
            monitor = self._current_monitor()
            if monitor is not None:
                self._publish(monitor.check())
            return generate_latest(self.registry)
