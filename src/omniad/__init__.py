"""omniad: unified visual anomaly detection — one model for every product type, one threshold, no type label."""

from omniad import data as datasets  # (readers, synthetic set, protocols)
from omniad import methods  # noqa: F401  (registers the built-in detectors)
from omniad._version import __version__
from omniad.export import ExportedDetector, export_detector
from omniad.fastpath import load_model
from omniad.io import load_detector
from omniad.metrics import evaluate
from omniad.prediction import Prediction, predict
from omniad.registry import create_detector, list_detectors, register_detector
from omniad.types import AnomalyScores, Detector, Sample

__all__ = [
    "__version__",
    "AnomalyScores",
    "Detector",
    "ExportedDetector",
    "Prediction",
    "Sample",
    "create_detector",
    "datasets",
    "evaluate",
    "export_detector",
    "list_detectors",
    "load_detector",
    "load_model",
    "predict",
    "register_detector",
]
