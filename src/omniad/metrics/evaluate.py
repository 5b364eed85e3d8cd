"""evaluate(): score a labelled test set and compute the pinned protocol (docs/evaluation.md) per category,
their mean, and pooled ("mixed"), plus decisions at one threshold calibrated on normal images only."""

from __future__ import annotations

import math
import platform
import resource
import sys
import time
from dataclasses import dataclass, field
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

IMAGE_PROTOCOL = (
    "Image level only (the test set has no masks): AUROC, AP, F1-max of the image scores, normal vs anomalous. "
    "Decisions: flagged when score > threshold, one threshold set on normal images only at a target false-alarm "
    "rate."
)


@dataclass
class ScoredSet:
    """A labelled test set's scores: what ``report_from_scores`` turns into a ``Report``.

    Attributes:
        scores: (N,) image scores (float64).
        maps: (N, H, W) anomaly maps (float32), a list of N (H_i, W_i) maps when their sizes differ (images
            read at their own size, e.g. for tiling), or None when only image scores exist.
        labels: (N,) 0 = normal, 1 = anomalous.
        masks: (N, H, W) boolean ground truth (a list like ``maps``), or None.
        has_mask: (N,) whether the sample's category has pixel ground truth.
        categories, defect_types, paths: per-sample metadata.
        score_seconds: time spent in ``score`` (for the report's throughput).
        setting: an image-level novelty setting (``omniad.data.novelty.NoveltySetting``) or None: when given,
            it defines the report's rows and the report has no pixel metrics.
    """

    scores: np.ndarray
    labels: np.ndarray
    categories: list[str]
    maps: np.ndarray | list[np.ndarray] | None = None
    masks: np.ndarray | list[np.ndarray] | None = None
    has_mask: np.ndarray | None = None
    defect_types: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    score_seconds: float = 0.0
    setting: Any = None

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        n = self.scores.size
        if self.labels.size != n or len(self.categories) != n:
            raise ValueError(f"{n} scores, {self.labels.size} labels and {len(self.categories)} categories differ")
        if self.has_mask is None:
            self.has_mask = np.full(n, self.masks is not None)
        self.defect_types = self.defect_types or ["good" if y == 0 else "defect" for y in self.labels]
        self.paths = self.paths or [""] * n
        bad = ~np.isfinite(self.scores)
        if bad.any():
            first = self.paths[int(np.flatnonzero(bad)[0])] or f"image {int(np.flatnonzero(bad)[0])}"
            raise ValueError(f"{int(bad.sum())} image scores are NaN or infinite (first: {first})")


def score_set(detector: Any, dataset: Any, progress: bool = True, batch_size: int | None = None) -> ScoredSet:
    """Score every sample of a labelled test set (dataset or list of ``Sample``) with a fitted detector. A dataset
    with a ``setting`` (a novelty test set) is image-level: its maps are not kept."""
    from omniad.data.sources import iterate_samples

    setting = getattr(dataset, "setting", None)

    n = len(dataset)
    if n == 0:
        raise ValueError("evaluate needs at least one test sample; the dataset given is empty")
    batch_size = int(batch_size or getattr(detector, "batch_size", 16) or 16)
    if getattr(detector, "min_score_batch", 1) > 1:  # a mutual scorer (musc) scores the whole set in one call
        batch_size = n
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
        if setting is None and maps is None:  # allocate once: no concatenation copies of ~N x H x W floats
            maps = np.empty((n, *batch_maps.shape[1:]), dtype=np.float32)
            masks = np.empty((n, *batch_maps.shape[1:]), dtype=bool)
        if isinstance(maps, np.ndarray) and maps.shape[1:] != batch_maps.shape[1:]:
            # images of several sizes (read at their own size): one map per image from here on
            maps, masks = list(maps[:pos]), list(masks[:pos])
        if isinstance(maps, list):
            maps += list(batch_maps.float().numpy())
            masks += list((batch.masks > 0.5).numpy())
        elif maps is not None:
            maps[pos : pos + b] = batch_maps.float().numpy()
            masks[pos : pos + b] = (batch.masks > 0.5).numpy()
        scores[pos : pos + b] = image_scores.double().numpy()
        labels[pos : pos + b] = batch.labels.numpy()
        has_mask[pos : pos + b] = batch.has_mask.numpy()
        categories += batch.categories
        defect_types += batch.defect_types
        paths += batch.paths
        pos += b
    return ScoredSet(scores, labels, categories, maps, masks, has_mask, defect_types, paths, score_seconds, setting)


def evaluate(
    detector: Any,
    dataset: Any,
    calibration: Any = None,
    target_far: float | None = None,
    progress: bool = True,
    batch_size: int | None = None,
) -> Report:
    """Score every test image and report the protocol's metrics: ``score_set`` then ``report_from_scores``.

    Args:
        detector: a fitted detector (``score(images) -> AnomalyScores``).
        dataset: a dataset (or list) of ``omniad.types.Sample`` with labels, masks and categories.
        calibration: optional normal images (dataset of ``Sample`` or tensors) to set the decision threshold
            on; by default the detector's own ``calibration_`` (set in ``fit`` on held-out normal training
            images) is used.
        target_far: false-alarm rate the threshold aims at; default the calibration's own. Without
            ``calibration`` images, the detector's held-out normal scores are re-calibrated at this rate (also
            for a loaded model: the scores are saved with it).
        progress: show a progress bar.
        batch_size: images per ``score`` call; default ``detector.batch_size`` (or 16).

    Returns:
        A ``Report`` with one row per category, ``mean`` and ``mixed``, its meta, and the raw per-image
        scores.
    """
    started = time.perf_counter()
    scored = score_set(detector, dataset, progress, batch_size)
    if calibration is not None:
        from omniad.calibration import Calibration

        far = float(target_far if target_far is not None else getattr(detector, "target_far", 0.01))
        normal = score_set_images(detector, calibration, progress, batch_size)
        decision = Calibration.from_normal_scores(normal, far, f"calibration set of {normal.size} normal images")
    else:
        decision = getattr(detector, "calibration_", None)
        if decision is not None and target_far is not None:
            decision = decision.at(target_far)
    report = report_from_scores(scored, decision, describe_detector(detector))
    report.meta["eval_seconds"] = time.perf_counter() - started
    return report


def score_set_images(detector: Any, images: Any, progress: bool = False, batch_size: int | None = None) -> np.ndarray:
    """Image scores of a set of (normal) images without labels, e.g. for calibration."""
    from omniad.data.sources import iterate_batches

    batch_size = int(batch_size or getattr(detector, "batch_size", 16) or 16)
    if getattr(detector, "min_score_batch", 1) > 1:  # a mutual scorer (musc) scores the whole set in one call
        batch_size = max(1, len(images))
    parts = [
        detector.score(batch).image_scores.detach().double().cpu().reshape(-1)
        for batch in iterate_batches(images, batch_size, progress, desc="calibrating")
    ]
    if not parts:
        raise ValueError("the calibration set is empty")
    return torch.cat(parts).numpy()


def report_from_scores(scored: ScoredSet, calibration: Any = None, detector_meta: dict[str, Any] | None = None
                       ) -> Report:
    """The protocol's metrics from scores: one row per category, their mean, the mixed row, and decisions at the
    one calibrated threshold (``calibration``: an ``omniad.calibration.Calibration`` or None). With a novelty
    ``scored.setting`` the rows are the setting's and there are no pixel metrics."""
    if scored.setting is not None:
        return _setting_report(scored, calibration, detector_meta)
    n = scored.scores.size
    names = list(dict.fromkeys(scored.categories))
    clash = [name for name in names if name in ("mean", "mixed")]
    if clash:
        raise ValueError(f"a category may not be named {clash[0]!r}: that name is taken by an aggregate row")
    flagged = calibration.decide(scored.scores) if calibration is not None else None
    cat_array = np.asarray(scored.categories)
    masks, maps, has_mask = scored.masks, scored.maps, scored.has_mask
    notes: list[str] = []
    rows: dict[str, dict[str, Any]] = {}
    for name in names:
        index = np.flatnonzero(cat_array == name)
        rows[name] = _row(scored.labels, scored.scores, index, flagged, _pixel_part(masks, maps, index, has_mask))
        if not has_mask[index].any():
            rows[name]["pixel_gt"] = False
    without_gt = [name for name in names if not rows[name]["pixel_gt"]]
    if without_gt:
        notes.append(
            f"no pixel ground truth for {', '.join(without_gt)}: their pixel metrics are n/a, and the mean "
            "and mixed pixel metrics cover the other categories only"
        )
    rows["mean"] = _mean_row([rows[name] for name in names])
    everything = np.arange(n)
    rows["mixed"] = _row(scored.labels, scored.scores, everything, flagged,
                         _pixel_part(masks, maps, everything, has_mask))
    rows["mixed"]["pixel_gt"] = bool(has_mask.any())
    if calibration is None:
        notes.append("the detector has no calibrated threshold: decision metrics are n/a")
    meta: dict[str, Any] = {"protocol": PROTOCOL, "fpr_limit": FPR_LIMIT, **(detector_meta or {})}
    meta.update(_run_facts(scored, calibration, names, notes))
    return Report(rows, meta, scored.scores, scored.labels, list(scored.categories), list(scored.defect_types),
                  list(scored.paths), flagged)


def _setting_report(scored: ScoredSet, calibration: Any, detector_meta: dict[str, Any] | None) -> Report:
    """Image-level report of a novelty setting: its rows (overlapping index sets), mean, mixed; no pixel
    columns."""
    setting = scored.setting
    flagged = calibration.decide(scored.scores) if calibration is not None else None
    no_pixels = dict.fromkeys(("auroc", "ap", "f1max", "aupro"), float("nan"))
    rows: dict[str, dict[str, Any]] = {}
    for name, index in setting.rows.items():
        if name in ("mean", "mixed"):
            raise ValueError(f"a class may not be named {name!r}: that name is taken by an aggregate row")
        rows[name] = _row(scored.labels, scored.scores, np.asarray(index, dtype=np.int64), flagged, no_pixels)
    rows["mean"] = _mean_row(list(rows.values()))
    # rows share images (every row holds all anomalies): count each image once
    rows["mean"].update(n_normal=int(np.sum(scored.labels == 0)), n_defective=int(np.sum(scored.labels == 1)))
    rows["mixed"] = _row(scored.labels, scored.scores, np.arange(scored.scores.size), flagged, no_pixels)
    for row in rows.values():
        for key in [k for k in row if k.startswith("pixel_")]:
            del row[key]
        row["pixel_gt"] = False
    notes = [] if calibration is not None else ["the detector has no calibrated threshold: decision metrics are n/a"]
    meta: dict[str, Any] = {"protocol": IMAGE_PROTOCOL, **(detector_meta or {}), "setting": setting.to_dict()}
    meta.update(_run_facts(scored, calibration, list(setting.rows), notes))
    return Report(rows, meta, scored.scores, scored.labels, list(scored.categories), list(scored.defect_types),
                  list(scored.paths), flagged)


def _run_facts(scored: ScoredSet, calibration: Any, names: list[str], notes: list[str]) -> dict[str, Any]:
    n, maps = scored.scores.size, scored.maps
    return {
        "n_images": n,
        "n_normal": int(np.sum(scored.labels == 0)),
        "n_defective": int(np.sum(scored.labels == 1)),
        "n_categories": len(names),
        "categories": names,
        "map_size": _map_size(maps),
        "score_seconds": scored.score_seconds,
        "images_per_second": n / scored.score_seconds if scored.score_seconds > 0 else None,
        "threshold": calibration.threshold if calibration is not None else float("nan"),
        "threshold_source": calibration.describe() if calibration is not None else "none (detector not calibrated)",
        "target_far": calibration.target_far if calibration is not None else None,
        "calibration_clusters": calibration.group_rates() if calibration is not None else [],
        "peak_rss_mb": _peak_rss_mb(),
        "notes": notes,
    }


def _contiguous(index: np.ndarray) -> slice | np.ndarray:
    """A slice when ``index`` is a contiguous range (a view instead of a copy of the maps), else ``index``."""
    if index.size and index[-1] - index[0] + 1 == index.size:
        return slice(int(index[0]), int(index[-1]) + 1)
    return index


def _map_size(maps: np.ndarray | list[np.ndarray] | None) -> Any:
    if maps is None:
        return None
    if isinstance(maps, list):
        sizes = {m.shape for m in maps}
        return list(sizes.pop()) if len(sizes) == 1 else f"own size per image ({len(sizes)} sizes)"
    return list(maps.shape[1:])


def _pixel_part(
    masks: np.ndarray | list[np.ndarray], maps: np.ndarray | list[np.ndarray], index: np.ndarray,
    has_mask: np.ndarray,
) -> dict[str, float]:
    index = index[has_mask[index]] if masks is not None else index[:0]
    if index.size == 0:
        return {key: float("nan") for key in ("auroc", "ap", "f1max", "aupro")}
    if isinstance(maps, list):
        return pixel_metrics([masks[i] for i in index], [maps[i] for i in index], fpr_limit=FPR_LIMIT)
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
    labels: np.ndarray, scores: np.ndarray, index: np.ndarray, flagged: np.ndarray | None, pixel: dict[str, float]
) -> dict[str, Any]:
    y, s = labels[index], scores[index]
    image = ranking_metrics(y, s)
    row: dict[str, Any] = {"n_normal": int(np.sum(y == 0)), "n_defective": int(np.sum(y == 1))}
    row.update({f"image_{k}": v for k, v in image.items()})
    row.update({f"pixel_{k}": v for k, v in pixel.items()})
    if flagged is not None:
        row.update(_decisions(y, flagged[index]))
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


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def describe_detector(detector: Any) -> dict[str, Any]:
    """What a report states about the detector: method, parameters, backbone, weights, image size, seed, device,
    fit time and versions."""
    get_params = getattr(detector, "get_params", None)
    backbone_module = getattr(detector, "backbone_", None)
    device = getattr(detector, "device_", None)
    meta: dict[str, Any] = {
        "detector": getattr(detector, "name", None) or type(detector).__name__,
        "detector_class": type(detector).__name__,
        "params": get_params() if callable(get_params) else {},
        "backbone": getattr(backbone_module, "name", None) or getattr(detector, "backbone", None),
        "weights_source": getattr(backbone_module, "weights_source", None) or getattr(detector, "weights", None),
        "image_size": getattr(detector, "image_size", None),
        "seed": getattr(detector, "seed", None),
        "fit_seconds": getattr(detector, "fit_seconds_", None),
        "fit_peak_memory_mb": getattr(detector, "fit_peak_memory_mb_", None),
        "device": str(device) if device is not None else "unknown",
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
    }
    note = getattr(detector, "backbone_note", None)  # e.g. a teacher standing in for the paper's
    if note:
        meta["backbone"] = f"{meta['backbone']} ({note})"
    if device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
        meta["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return meta
