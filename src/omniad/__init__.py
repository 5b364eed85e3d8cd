"""omniad: unified visual anomaly detection — one model for every product type, one threshold, no type label."""

__version__ = "0.1.0"

from omniad import data as datasets  # noqa: E402  (readers, synthetic set, protocols)
from omniad.io import load_detector  # noqa: E402
from omniad.metrics import evaluate  # noqa: E402
from omniad.registry import create_detector, list_detectors, register_detector  # noqa: E402
from omniad.types import AnomalyScores, Detector, Sample  # noqa: E402

__all__ = [
    "__version__",
    "AnomalyScores",
    "Detector",
    "Sample",
    "create_detector",
    "datasets",
    "evaluate",
    "list_detectors",
    "load_detector",
    "register_detector",
]
