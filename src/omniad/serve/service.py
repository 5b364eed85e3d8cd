"""What the HTTP service does, without the web framework: load a model, describe it, turn uploaded bytes into
the model's input, score in batches on one worker thread, decide with the model's one ``Calibration``, draw
overlays. ``omniad.serve.app`` only maps HTTP onto these functions.

Any object with the detector scoring interface can be served: ``score(images)`` returning ``image_scores`` and
``anomaly_maps``, ``preprocess``, ``calibration_``, ``image_size``, ``batch_size``, ``name`` (a torch
detector, or an exported model).
"""

from __future__ import annotations

import base64
import io
import os
import queue
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from omniad.data.images import ImageReadError, ImageTooLargeError, decode_image
from omniad.metrics.result import json_values
from omniad.prediction import check_finite_scores
from omniad.report import overlay_heatmap, overlay_scale

# base parameters that make the image score from the raw map (what an exported model must reproduce)
_SCORE_TAIL = ("sigma", "image_pooling", "top_fraction", "pool_kernel")


def load_model(path: str | os.PathLike, device: str | None = None, runtime: str | None = None,
               precision: str = "f32") -> Any:
    """The model the service runs: the one place the service loads a model (the CLI and the benchmark call it).

    Args:
        path: a model folder written by ``omniad fit`` / ``detector.save``, or a file written by ``omniad export``
            (.onnx, or OpenVINO's .xml): the service runs on torch or on the exported file alike.
        device: override the saved device choice ("cpu", "cuda", ...).
        runtime: for a model folder, what scores it ("auto", "openvino", "onnxruntime", "torch"; see
            ``omniad.fastpath``); None: the torch detector. ``omniad serve`` passes "auto" by default.
        precision: "f32" (default), or OpenVINO's "bf16" / "f16" (``omniad.fastpath``).
    """
    from omniad.fastpath import load_model as load_any_model

    return load_any_model(path, device=device, runtime=runtime, precision=precision)


class ServeError(ValueError):
    """A request the service refuses or cannot answer: ``status`` is the HTTP status, ``filename`` the uploaded
    file it concerns (or None)."""

    def __init__(self, status: int, message: str, filename: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.filename = status, message, filename


def model_info(detector: Any) -> dict[str, Any]:
    """What ``GET /model`` answers: the model's facts, its decision rule and the normal scores behind it.

    Attributes not every model has (backbone, categories, parameters) are None when absent. Torch bundles do
    not record the categories they were trained on (a unified model never reads them), so they are None there.
    """
    calibration = getattr(detector, "calibration_", None)
    params = detector.get_params() if callable(getattr(detector, "get_params", None)) else getattr(
        detector, "params", None)
    metadata = getattr(detector, "metadata", None)
    categories = getattr(detector, "categories_", None) or getattr(detector, "categories", None) or (
        metadata.get("categories") if isinstance(metadata, dict) else None)
    return json_values({
        "name": detector.name,
        "model_class": f"{type(detector).__module__}.{type(detector).__qualname__}",
        "backbone": getattr(detector, "backbone", None),
        "image_size": int(detector.image_size),
        "runtime": getattr(detector, "runtime_note", "torch"),
        "batch_size": int(getattr(detector, "batch_size", 1) or 1),
        "threshold": None if calibration is None else calibration.threshold,
        "target_far": None if calibration is None else calibration.target_far,
        "calibration_source": None if calibration is None else calibration.source,
        "calibration": None if calibration is None else calibration.describe(),
        # sorted: the page computes the false-alarm rate of any threshold from them by bisection
        "normal_scores": [] if calibration is None else sorted(float(v) for v in calibration.normal_scores),
        "categories": None if categories is None else list(categories),
        "protocol": protocol(detector),
        "params": None if params is None else dict(params),
    })


def protocol(detector: Any) -> dict[str, Any] | None:
    """How the model turns an image into a decision: the model's own ``protocol`` (or its file metadata's, for an
    exported model), else, for a torch detector, the decision rule, the score tail and the evaluation protocol
    (the shape an exported file's metadata carries)."""
    own = getattr(detector, "protocol", None)
    if own is None and isinstance(getattr(detector, "metadata", None), dict):
        own = detector.metadata.get("protocol")
    if own is not None:
        return dict(own)
    resolved = getattr(detector, "resolved_", None)
    if resolved is None:
        return None
    from omniad.metrics.evaluate import PROTOCOL

    return {
        "decision": "anomalous when the image score is strictly above the threshold",
        "image_size": int(detector.image_size),
        "score_tail": {name: getattr(resolved, name, None) for name in _SCORE_TAIL},
        "evaluation": PROTOCOL,
    }


def prepare_upload(detector: Any, data: bytes, filename: str, max_pixels: int | None = None, draft: bool = True
                   ) -> Tensor:
    """An uploaded file's bytes -> the model's (3, image_size, image_size) input, read as ``read_image`` reads
    files (a large JPEG draft-decoded unless ``draft`` is False, as ``predict`` reads it) and checked by the
    model's own ``preprocess``.

    Raises:
        ServeError: 413 for an image over the pixel limit, 422 for anything that is not a readable image.
    """
    try:
        # the served models take a square side (BatchScorer): read at it, as predict reads files
        # an exported graph's uploads in uint8, its input type, as predict reads its files
        dtype = getattr(detector, "read_dtype", torch.float32)
        image = decode_image(data, filename, max_pixels=max_pixels, size=int(detector.image_size), draft=draft,
                             dtype=dtype)
    except ImageTooLargeError as err:
        raise ServeError(413, str(err), filename) from None
    except ImageReadError as err:
        raise ServeError(422, str(err), filename) from None
    try:
        return detector.preprocess(image)[0]
    except (TypeError, ValueError) as err:
        raise ServeError(422, f"{filename}: {err}", filename) from None


def overlay_png(image: Tensor, amap: Tensor, vmin: float, vmax: float) -> str:
    """The heat-map overlay of one image (``omniad.report.overlay_heatmap``) as base64-encoded PNG."""
    buffer = io.BytesIO()
    image = image.float() / 255.0 if image.dtype == torch.uint8 else image
    overlay_heatmap(image, amap, vmin=vmin, vmax=vmax).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def predict_payload(detector: Any, names: list[str], images: Tensor, scores: np.ndarray, maps: Tensor,
                    overlays: bool) -> dict[str, Any]:
    """The JSON of ``POST /predict``: one entry per image, decided by the model's ``Calibration.decide``.

    Overlays of one request share one colour scale (``omniad.report.overlay_scale``: its maps and the threshold).

    Raises:
        ValueError: a score is NaN or infinite (``Calibration.decide`` refuses to decide on it), naming the files.
    """
    calibration = getattr(detector, "calibration_", None)
    check_finite_scores(names, scores)
    threshold = None if calibration is None else float(calibration.threshold)
    decisions: list[bool | None] = [None] * len(names)
    if calibration is not None:
        decisions = [bool(d) for d in calibration.decide(scores)]
    scale = overlay_scale(maps, threshold) if overlays else None
    results = []
    for i, name in enumerate(names):
        entry: dict[str, Any] = {
            "filename": name,
            "score": float(scores[i]),
            "anomalous": decisions[i],
            "decision": None if decisions[i] is None else ("anomalous" if decisions[i] else "normal"),
            "threshold": threshold,
            "model": detector.name,
        }
        if scale is not None:
            entry["overlay_png"] = overlay_png(images[i], maps[i], *scale)
        results.append(entry)
    return {"model": detector.name, "threshold": threshold, "results": results}


@dataclass
class _Job:
    images: Tensor
    future: Future


class BatchScorer:
    """Scores images on one worker thread, joining the images of concurrent requests into one batch.

    A request's images are one job; the worker takes the next job and adds the jobs already waiting while they
    fit in ``batch_size`` images, so batching adds no waiting under light load and fills batches under heavy
    load (a request of more images than ``batch_size`` is one call, which the model splits into batches). The
    model is only ever called from this thread (torch detectors are not thread-safe to share).

    Args:
        detector: the model (``score`` returns ``image_scores`` and ``anomaly_maps``).
        batch_size: images per batch (default: the model's ``batch_size``).
    """

    def __init__(self, detector: Any, batch_size: int | None = None) -> None:
        if getattr(detector, "tile_size", None) is not None or not isinstance(getattr(detector, "image_size", 0), int):
            # uploads are joined into batches of one input size: tiled (own size per image) and aspect-kept
            # (padding cut per image) models are not served (yet); score them with omniad predict
            raise ValueError(f"{detector.name}: tiled or (height, width) image_size models cannot be served yet "
                             "(the service joins uploads into batches of one size); use omniad predict")
        self.detector = detector
        self.batch_size = max(1, int(batch_size or getattr(detector, "batch_size", 16) or 16))
        self.batch_sizes: deque[int] = deque(maxlen=1000)  # images per model call, the latest 1000 (for tests)
        self.calls = 0  # model calls and images scored since start (for /health and the load benchmark)
        self.images = 0
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, images: Tensor) -> Future:
        """Queue (N, 3, H, W) images; the future gives ((N,) float64 scores, (N, h, w) maps) or the model's error."""
        job = _Job(images, Future())
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="omniad-scorer", daemon=True)
                self._thread.start()
            self._queue.put(job)
        return job.future

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker after the jobs already queued (a later ``submit`` starts a new one)."""
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is not None:
                self._queue.put(None)
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        carried: _Job | None = None  # a job taken while filling a batch that did not fit: it starts the next one
        while True:
            job = carried if carried is not None else self._queue.get()
            carried = None
            if job is None:
                return
            jobs, count, stop = [job], len(job.images), False
            while count < self.batch_size:
                try:
                    waiting = self._queue.get_nowait()
                except queue.Empty:
                    break
                if waiting is None:  # score what was taken, then stop
                    stop = True
                    break
                if count + len(waiting.images) > self.batch_size:
                    carried = waiting
                    break
                jobs.append(waiting)
                count += len(waiting.images)
            self._score([j for j in jobs if j.future.set_running_or_notify_cancel()])
            if stop:
                return

    def _score(self, jobs: list[_Job]) -> None:
        if not jobs:
            return
        try:
            scores, maps = self._call([j.images for j in jobs])
        except Exception as err:  # noqa: BLE001 - the error goes to the request that caused it
            if len(jobs) == 1:
                jobs[0].future.set_exception(err)
                return
            for job in jobs:  # one request's bad input must not fail the others joined into its batch
                try:
                    job.future.set_result(self._call([job.images]))
                except Exception as own:  # noqa: BLE001
                    job.future.set_exception(own)
            return
        start = 0
        for job in jobs:
            end = start + len(job.images)
            job.future.set_result((scores[start:end], maps[start:end]))
            start = end

    def _call(self, parts: list[Tensor]) -> tuple[np.ndarray, Tensor]:
        images = torch.cat(parts) if len(parts) > 1 else parts[0]
        result = self.detector.score(images)
        self.batch_sizes.append(len(images))
        self.calls += 1
        self.images += len(images)
        scores = np.asarray(_numpy(result.image_scores), dtype=np.float64).reshape(-1)
        maps = torch.as_tensor(_numpy(result.anomaly_maps)).float()
        if scores.size != len(images) or len(maps) != len(images):
            raise RuntimeError(
                f"{type(self.detector).__name__}.score returned {scores.size} scores and {len(maps)} maps for "
                f"{len(images)} images"
            )
        return scores, maps


def _numpy(values: Any) -> Any:
    return values.detach().cpu().numpy() if hasattr(values, "detach") else np.asarray(values)


__all__ = ["BatchScorer", "ServeError", "load_model", "model_info", "overlay_png", "predict_payload",
           "prepare_upload", "protocol"]
