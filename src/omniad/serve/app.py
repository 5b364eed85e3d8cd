"""The FastAPI application of ``omniad serve``: HTTP onto ``omniad.serve.service``, and the page at ``/``.

    POST /predict[?overlay=true]   multipart field ``files``: one or several images -> JSON per image
    GET  /model                    the model, its threshold and the held-out normal scores behind it
    GET  /health                   liveness, and the alarm monitor's state
    GET  /metrics                  Prometheus text format: requests, images, alarms, score histogram, the alarm
                                   rate of the latest images against the calibrated rate (``serve.metrics``)
    GET  /                         the page (static/index.html, app.js, style.css)

Refusals are JSON ``{"detail": message, "filename": file or null}`` with a 4xx status: 400 (a malformed multipart
body), 413 (upload, image or file count over the limits), 415 (not multipart, or a file that is not an image
type), 422 (no files, or a file that is not a readable image); 500 when the model fails. A failed request
leaves nothing behind: the next one is served as usual.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from omniad._version import __version__
from omniad.monitor import WINDOW
from omniad.serve.metrics import ServiceMetrics
from omniad.serve.service import BatchScorer, ServeError, model_info, predict_payload, prepare_upload

STATIC = Path(__file__).with_name("static")
FIELD = "files"
DEFAULT_MAX_UPLOAD_BYTES = 32 * 2**20
DEFAULT_MAX_BATCH = 32


def create_app(
    detector: Any,
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_pixels: int | None = None,
    batch_size: int | None = None,
    monitor_window: int = WINDOW,
    draft: bool = True,
) -> FastAPI:
    """The service of one fitted model.

    Args:
        detector: a fitted model with the scoring interface (``score``, ``preprocess``, ``calibration_``,
            ``image_size``, ``batch_size``, ``name``): a torch detector or an exported one.
        max_upload_bytes: largest request body; bigger ones get 413 before they are read to the end.
        max_batch: most files in one request (413 above).
        max_pixels: largest image (width x height) decoded; None: Pillow's decompression-bomb limit.
        batch_size: images per model call (default the model's), joining concurrent requests' images.
        monitor_window: latest images whose alarm rate is tested against the calibrated false-alarm rate
            (``omniad.monitor``); each ``/predict`` answer carries the test as ``monitor``.
        draft: decode uploaded JPEGs at least twice the model's size at a reduced scale, as ``predict`` does
            (``read_image``); False: full decoding.

    Returns:
        The FastAPI application (run it with uvicorn, or ``omniad.serve.run``).
    """
    if max_upload_bytes < 1 or max_batch < 1:
        raise ValueError(f"max_upload_bytes and max_batch must be positive, got {max_upload_bytes}, {max_batch}")
    scorer = BatchScorer(detector, batch_size)
    metrics = ServiceMetrics(detector, monitor_window)
    limits = {"max_upload_bytes": max_upload_bytes, "max_batch": max_batch, "max_pixels": max_pixels}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        scorer.close()

    app = FastAPI(title=f"omniad serve: {detector.name}", version=__version__, lifespan=lifespan,
                  description="Anomaly scores, decisions and heat maps of one unified omniad model.")
    app.state.detector, app.state.scorer, app.state.metrics = detector, scorer, metrics

    @app.exception_handler(ServeError)
    async def refused(request: Request, err: ServeError) -> JSONResponse:
        metrics.refused.inc()
        return JSONResponse({"detail": err.message, "filename": err.filename}, status_code=err.status)

    @app.get("/health")
    def health() -> dict[str, Any]:
        check = metrics.status()
        return {"status": "ok", "model": detector.name, "model_calls": scorer.calls, "images_scored": scorer.images,
                "monitor": None if check is None else check.to_dict()}

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/model")
    def model() -> dict[str, Any]:
        # read each time: a model re-calibrated in Python while served (detector.calibrate) is described as it is
        return {**model_info(detector), "limits": limits}

    @app.post("/predict", openapi_extra=_MULTIPART_SCHEMA)
    async def predict(request: Request, overlay: bool = False) -> dict[str, Any]:
        """Score the images of the multipart field ``files``; ``overlay=true`` adds each heat-map overlay PNG."""
        names, blobs = await _read_uploads(request, max_upload_bytes, max_batch)
        images = await run_in_threadpool(_prepare_all, detector, names, blobs, max_pixels, draft)
        try:
            scores, maps = await asyncio.wrap_future(scorer.submit(torch.stack(images)))
            payload = await run_in_threadpool(predict_payload, detector, names, images, scores, maps, overlay)
        except Exception as err:  # noqa: BLE001 - a model failure is the server's, said plainly
            raise ServeError(500, f"scoring failed: {err}") from err
        payload["monitor"] = metrics.record(scores, [r["anomalous"] for r in payload["results"]])
        return payload

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


_MULTIPART_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": [FIELD],
            "properties": {FIELD: {"type": "array", "items": {"type": "string", "format": "binary"}}},
        }}},
    }
}


async def _read_uploads(request: Request, max_bytes: int, max_batch: int) -> tuple[list[str], list[bytes]]:
    """The names and bytes of the uploaded files, after every check that needs no decoding."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise ServeError(415, f"POST /predict takes multipart/form-data with the images in the field '{FIELD}'; "
                              f"got content type {content_type or 'none'!r}")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise ServeError(413, _too_large(f"{int(declared)} bytes", max_bytes))
    # the body is counted as it arrives, so a request without (or with a false) Content-Length is cut off too
    limited = Request(request.scope, _counting(request.receive, max_bytes))
    try:
        form = await limited.form(max_files=max(1000, max_batch + 1))
    except HTTPException as err:  # Starlette's word on a malformed body, in the service's own shape
        raise ServeError(400, f"malformed multipart upload: {err.detail}") from None
    try:
        uploads = form.getlist(FIELD)
        if not uploads:
            sent = ", ".join(sorted(set(form.keys()))) or "none"
            raise ServeError(422, f"no images: send one or more image files in the multipart field '{FIELD}' "
                                  f"(fields sent: {sent})")
        if len(uploads) > max_batch:
            raise ServeError(413, f"{len(uploads)} files in one request; this service takes at most {max_batch} "
                                  "per request (send them in several requests)")
        names, blobs = [], []
        for number, upload in enumerate(uploads):
            if not isinstance(upload, UploadFile):
                raise ServeError(422, f"the field '{FIELD}' must hold files; value {number + 1} is text")
            name = upload.filename or f"file {number + 1}"
            kind = (upload.content_type or "").split(";")[0].strip().lower()
            if kind and not (kind.startswith("image/") or kind == "application/octet-stream"):
                raise ServeError(415, f"{name}: content type {kind!r} is not an image type (send image/png, "
                                      "image/jpeg, ... or application/octet-stream)", name)
            names.append(name)
            blobs.append(await upload.read())
        return names, blobs
    finally:
        await form.close()


def _counting(receive: Callable[[], Awaitable[dict]], max_bytes: int) -> Callable[[], Awaitable[dict]]:
    received = 0

    async def counted() -> dict:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > max_bytes:
                raise ServeError(413, _too_large(f"more than {max_bytes} bytes", max_bytes))
        return message

    return counted


def _too_large(size: str, limit: int) -> str:
    return (f"upload too large: {size}; this service takes at most {limit} bytes ({limit / 2**20:.3g} MiB) "
            "per request")


def _prepare_all(detector: Any, names: list[str], blobs: list[bytes], max_pixels: int | None, draft: bool) -> list:
    return [prepare_upload(detector, blob, name, max_pixels, draft) for name, blob in zip(names, blobs, strict=True)]
