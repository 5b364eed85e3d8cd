"""Metrics of the pinned protocol (docs/evaluation.md) and ``evaluate`` -> ``Report``."""

from omniad.metrics.evaluate import PROTOCOL, ScoredSet, describe_detector, evaluate, report_from_scores, score_set
from omniad.metrics.pro import aupro, pixel_metrics
from omniad.metrics.ranking import (
    auroc,
    average_precision,
    f1_max,
    image_ap,
    image_auroc,
    image_f1max,
    pixel_ap,
    pixel_auroc,
    pixel_f1max,
    ranking_metrics,
)
from omniad.metrics.result import Report

__all__ = [
    "PROTOCOL",
    "Report",
    "aupro",
    "auroc",
    "average_precision",
    "ScoredSet",
    "describe_detector",
    "evaluate",
    "report_from_scores",
    "score_set",
    "f1_max",
    "image_ap",
    "image_auroc",
    "image_f1max",
    "pixel_ap",
    "pixel_auroc",
    "pixel_f1max",
    "pixel_metrics",
    "ranking_metrics",
]
