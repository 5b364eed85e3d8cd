"""evaluate(): score a labelled test set and compute the pinned protocol (DESIGN.md section 4) per category,
their mean, and pooled ("mixed"), plus decisions at one threshold calibrated on normal images only."""

from __future__ import annotations

import math
import platform
import resource
import sys
import time
from typing import Any

import numpy as np
import torch

from omniad.metrics.pro import pixel_metrics
from omniad.metrics.ranking import ranking_metrics
from omniad.metrics.result import DECISION_COLUMNS, RANKING_COLUMNS, Report

FPR_LIMIT = 0.3

PROTOCOL = (
    "Images and masks resized to the image size; masks binarised at > 0.5 after resizing. Anomaly maps "
    "and image scores as the detector returns them (by default: Gaussian smoothing sigma 4, image score = "
    "mean of the top 1% of map values, unless the method says otherwise). Image level: AUROC, AP, F1-max "
    "(best F1 over all thresholds). Pixel level, over every pixel of the images that have ground truth: "
    "AUROC, AP, F1-max, AU-PRO "
    f"(per-region overlap of 8-connected defect regions, integrated up to FPR {FPR_LIMIT} and normalised). "
    "Rows: one per category; 'mean' = mean of the per-category values (the unified setting); 'mixed' = all "
    "categories pooled into one ranking (the absolute-unified setting, one threshold for all). Decisions: "
    "flagged when score > threshold, one threshold for every category, set on normal images only at a target "
    "false-alarm rate (no anomalies used)."
)


def evaluate(
    detector: Any,
    dataset: Any,
    calibration: Any = None,
    target_far: float | None = None,
    progress: bool = True,
    batch_size: int | None = None,
) -> Report:
    """Score every test image and report the protocol's metrics.

    Args:
        detector: a fitted detector (``score(images) -> AnomalyScores``).
        dataset: a dataset (or list) of ``omniad.types.Sample`` with labels, masks and categories.
        calibration: optional normal images (dataset of ``Sample`` or tensors) to set the decision threshold
            on; by default the detector's own ``threshold_`` (calibrated in ``fit`` on held-out normal
            training images) is used.
        target_far: false-alarm rate the threshold aims at on the calibration images; default
            ``detector.target_far``. Without ``calibration``, a given ``target_far`` re-calibrates on the
            detector's held-out scores (``calibration_scores_``) when it has them.
        progress: show a progress bar.
        batch_size: images per ``score`` call; default ``detector.batch_size`` (or 16).

    Returns:
        A ``Report`` with one row per category, ``mean`` and ``mixed``, its meta, and the raw per-image
        scores.
    """
    from omniad.data.sources import iterate_samples

    n = len(dataset)
    if n == 0:
        raise ValueError("evaluate needs at least one test sample; the dataset given is empty")
    batch_size = int(batch_size or getattr(detector, "batch_size", 16) or 16)
    started = time.perf_counter()
    score_seconds = 0.0
    scores = np.empty(n, dtype=np.float64)
    labels = np.empty(n, dtype=np.int64)
    has_mask = np.empty(n, dtype=bool)
    categories: list[str] = []
    defect_types: list[str] = []
    paths: list[str] = []
    maps: np.ndarray | None = None
    masks: np.ndarray | None = None
    pos = 0
    for batch in iterate_samples(dataset, batch_size, progress, desc="evaluating"):
        t0 = time.perf_counter()
        result = detector.score(batch.images)
        score_seconds += time.perf_counter() - t0
        b = len(batch)
        image_scores = result.image_scores.detach().float().cpu().reshape(-1)
        batch_maps = result.anomaly_maps.detach().cpu()
        if image_scores.numel() != b or batch_maps.shape[0] != b:
            raise ValueError(
                f"{type(detector).__name__}.score returned {image_scores.numel()} scores and maps of shape "
                f"{tuple(batch_maps.shape)} for a batch of {b} images"
            )
        if batch_maps.shape[1:] != batch.masks.shape[1:]:
            raise ValueError(
                f"anomaly maps of shape {tuple(batch_maps.shape[1:])} do not match the masks "
                f"{tuple(batch.masks.shape[1:])}: the protocol evaluates maps at the input resolution"
            )
        if maps is None:  # allocate once: no concatenation copies of ~N x H x W floats
            maps = np.empty((n, *batch_maps.shape[1:]), dtype=np.float32)
            masks = np.empty((n, *batch_maps.shape[1:]), dtype=bool)
        maps[pos : pos + b] = batch_maps.float().numpy()
        masks[pos : pos + b] = (batch.masks > 0.5).numpy()
        scores[pos : pos + b] = image_scores.double().numpy()
        labels[pos : pos + b] = batch.labels.numpy()
        has_mask[pos : pos + b] = batch.has_mask.numpy()
        categories += batch.categories
        defect_types += batch.defect_types
        paths += batch.paths
        pos += b
    if not np.isfinite(scores).all():
        raise ValueError(f"{type(detector).__name__} returned NaN or infinite image scores")

    threshold, threshold_source, far = _threshold(detector, calibration, target_far, batch_size, progress)
    names = list(dict.fromkeys(categories))
    clash = [name for name in names if name in ("mean", "mixed")]
    if clash:
        raise ValueError(f"a category may not be named {clash[0]!r}: that name is taken by an aggregate row")
    cat_array = np.asarray(categories)
    notes: list[str] = []
    rows: dict[str, dict[str, Any]] = {}
    for name in names:
        index = np.flatnonzero(cat_array == name)
        rows[name] = _row(scores, labels, index, threshold, _pixel_part(masks, maps, index, has_mask))
        if not has_mask[index].any():
            rows[name]["pixel_gt"] = False
    without_gt = [name for name in names if not rows[name]["pixel_gt"]]
    if without_gt:
        notes.append(
            f"no pixel ground truth for {', '.join(without_gt)}: their pixel metrics are n/a, and the mean "
            "and mixed pixel metrics cover the other categories only"
        )
    map_size = list(maps.shape[1:]) if maps is not None else None
    rows["mean"] = _mean_row([rows[name] for name in names])
    rows["mixed"] = _row(
        scores, labels, np.arange(n), threshold, _pixel_part(masks, maps, np.arange(n), has_mask)
    )
    del maps, masks
    if not math.isfinite(threshold):
        notes.append("the detector has no calibrated threshold: decision metrics are n/a")
    eval_seconds = time.perf_counter() - started

    meta = _meta(
        detector, n, labels, score_seconds, eval_seconds, threshold, threshold_source, far, cat_array
    )
    meta["categories"] = names
    meta["map_size"] = map_size
    meta["notes"] = notes
    return Report(rows, meta, scores, labels, categories, defect_types, paths)


def _contiguous(index: np.ndarray) -> slice | np.ndarray:
    """A slice when ``index`` is a contiguous range (a view instead of a copy of the maps), else ``index``."""
    if index.size and index[-1] - index[0] + 1 == index.size:
        return slice(int(index[0]), int(index[-1]) + 1)
    return index


def _pixel_part(
    masks: np.ndarray, maps: np.ndarray, index: np.ndarray, has_mask: np.ndarray
) -> dict[str, float]:
    index = index[has_mask[index]]
    if index.size == 0:
        return {key: float("nan") for key in ("auroc", "ap", "f1max", "aupro")}
    where = _contiguous(index)
    return pixel_metrics(masks[where], maps[where], fpr_limit=FPR_LIMIT)


def _decisions(labels: np.ndarray, flagged: np.ndarray) -> dict[str, float]:
    tp = float(np.sum(flagged & (labels == 1)))
    fp = float(np.sum(flagged & (labels == 0)))
    fn = float(np.sum(~flagged & (labels == 1)))
    tn = float(np.sum(~flagged & (labels == 0)))
    nan = float("nan")
    return {
        "precision": tp / (tp + fp) if tp + fp else nan,
        "recall": tp / (tp + fn) if tp + fn else nan,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fn else nan,
        "false_alarm_rate": fp / (fp + tn) if fp + tn else nan,
        "miss_rate": fn / (tp + fn) if tp + fn else nan,
    }


def _row(
    scores: np.ndarray, labels: np.ndarray, index: np.ndarray, threshold: float, pixel: dict[str, float]
) -> dict[str, Any]:
    y, s = labels[index], scores[index]
    image = ranking_metrics(y, s)
    row: dict[str, Any] = {"n_normal": int(np.sum(y == 0)), "n_defective": int(np.sum(y == 1))}
    row.update({f"image_{k}": v for k, v in image.items()})
    row.update({f"pixel_{k}": v for k, v in pixel.items()})
    if math.isfinite(threshold):
        row.update(_decisions(y, s > threshold))
    else:
        row.update({key: float("nan") for key, _ in DECISION_COLUMNS})
    row["pixel_gt"] = True
    return row


def _mean_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over categories of each metric, skipping the categories where it is undefined."""
    out: dict[str, Any] = {
        "n_normal": sum(r["n_normal"] for r in rows),
        "n_defective": sum(r["n_defective"] for r in rows),
    }
    for key, _ in RANKING_COLUMNS + DECISION_COLUMNS:
        values = [r[key] for r in rows if math.isfinite(r[key])]
        out[key] = float(np.mean(values)) if values else float("nan")
    out["pixel_gt"] = any(r["pixel_gt"] for r in rows)
    return out


def _threshold(
    detector: Any, calibration: Any, target_far: float | None, batch_size: int, progress: bool
) -> tuple[float, str, float | None]:
    """The decision threshold, a description of where it came from, and its target false-alarm rate."""
    from omniad.calibration import threshold_at_far

    far = float(target_far if target_far is not None else getattr(detector, "target_far", 0.01))
    if calibration is not None:
        from omniad.data.sources import iterate_batches

        parts = [
            detector.score(images).image_scores.detach().double().cpu().reshape(-1)
            for images in iterate_batches(calibration, batch_size, progress, desc="calibrating")
        ]
        if not parts:
            raise ValueError("the calibration set is empty")
        normal = torch.cat(parts).numpy()
        return (
            threshold_at_far(normal, far),
            f"calibration set of {normal.size} normal images, target FAR {far}",
            far,
        )
    held_out = getattr(detector, "calibration_scores_", None)
    if target_far is not None and held_out is not None:
        normal = np.asarray(held_out.numpy() if hasattr(held_out, "numpy") else held_out, dtype=np.float64)
        return (
            threshold_at_far(normal, far),
            f"{normal.size} held-out normal training images, target FAR {far}",
            far,
        )
    threshold = float(getattr(detector, "threshold_", float("nan")))
    if not math.isfinite(threshold):
        return threshold, "none (detector not calibrated)", None
    fit_far = getattr(detector, "target_far", None)
    return (
        threshold,
        f"detector.threshold_ from held-out normal training images, target FAR {fit_far}",
        fit_far,
    )


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _meta(
    detector: Any,
    n: int,
    labels: np.ndarray,
    score_seconds: float,
    eval_seconds: float,
    threshold: float,
    threshold_source: str,
    far: float | None,
    categories: np.ndarray,
) -> dict[str, Any]:
    get_params = getattr(detector, "get_params", None)
    backbone_module = getattr(detector, "backbone_", None)
    device = getattr(detector, "device_", None)
    meta: dict[str, Any] = {
        "protocol": PROTOCOL,
        "fpr_limit": FPR_LIMIT,
        "detector": getattr(detector, "name", None) or type(detector).__name__,
        "detector_class": type(detector).__name__,
        "params": get_params() if callable(get_params) else {},
        "backbone": getattr(backbone_module, "name", None) or getattr(detector, "backbone", None),
        "weights_source": getattr(backbone_module, "weights_source", None)
        or getattr(detector, "weights", None),
        "image_size": getattr(detector, "image_size", None),
        "seed": getattr(detector, "seed", None),
        "n_images": n,
        "n_normal": int(np.sum(labels == 0)),
        "n_defective": int(np.sum(labels == 1)),
        "n_categories": int(len(set(categories.tolist()))),
        "fit_seconds": getattr(detector, "fit_seconds_", None),
        "score_seconds": score_seconds,
        "images_per_second": n / score_seconds if score_seconds > 0 else None,
        "eval_seconds": eval_seconds,
        "peak_rss_mb": _peak_rss_mb(),
        "threshold": threshold,
        "threshold_source": threshold_source,
        "target_far": far,
        "device": str(device) if device is not None else "unknown",
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
    }
    if device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
        meta["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return meta
