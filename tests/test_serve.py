"""omniad serve, in-process (FastAPI's TestClient): every endpoint, batching, every refused input with its status
and message, and the service answering after each; scores are the model's own on the same image."""

from __future__ import annotations

import base64
import copy
import io
import struct
import threading
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'omniad[serve]'")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx (in the test extra)")

from fastapi.testclient import TestClient  # noqa: E402

from omniad.calibration import Calibration  # noqa: E402
from omniad.cli import main  # noqa: E402
from omniad.data.images import read_image  # noqa: E402
from omniad.registry import create_detector  # noqa: E402
from omniad.serve import BatchScorer, create_app, load_model, model_info  # noqa: E402
from omniad.types import AnomalyScores  # noqa: E402

SIZE = 64


@pytest.fixture(scope="module")
def detector():
    """A tiny fitted PaDiM (random backbone weights: fast, and the service does not care what it learned)."""
    images = torch.rand(16, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    return create_detector("padim", weights="random", image_size=SIZE, batch_size=8, device="cpu", progress=False,
                           calibration_fraction=0.25).fit(images)


@pytest.fixture(scope="module")
def client(detector):
    with TestClient(create_app(detector, max_upload_bytes=2**20, max_batch=12)) as test_client:
        yield test_client


def image_bytes(seed: int, size: tuple[int, int] = (SIZE, SIZE), fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def upload(name: str, data: bytes, kind: str = "image/png") -> tuple[str, tuple[str, bytes, str]]:
    return ("files", (name, data, kind))


def assert_still_answers(client) -> None:
    assert client.get("/health").json()["status"] == "ok"
    response = client.post("/predict", files=[upload("ok.png", image_bytes(99))])
    assert response.status_code == 200 and response.json()["results"][0]["filename"] == "ok.png"


# ------------------------------------------------------------------ endpoints
def test_health(client, detector):
    before = client.get("/health").json()
    assert before["status"] == "ok" and before["model"] == detector.name
    client.post("/predict", files=[upload("a.png", image_bytes(1)), upload("b.png", image_bytes(2))])
    after = client.get("/health").json()
    assert (after["model_calls"], after["images_scored"]) == (before["model_calls"] + 1, before["images_scored"] + 2)


def test_model_describes_the_model_and_its_calibration(client, detector):
    info = client.get("/model").json()
    calibration = detector.calibration_
    assert info["name"] == "padim" and info["backbone"] == detector.backbone
    assert info["image_size"] == SIZE and info["batch_size"] == 8
    assert info["threshold"] == calibration.threshold and info["target_far"] == calibration.target_far
    assert info["calibration_source"] == calibration.source
    assert info["normal_scores"] == sorted(info["normal_scores"]) == calibration.normal_scores.tolist()
    assert info["categories"] is None  # a torch bundle does not record them
    assert info["protocol"]["score_tail"] == {"sigma": detector.resolved_.sigma,
                                              "image_pooling": detector.resolved_.image_pooling,
                                              "top_fraction": detector.resolved_.top_fraction,
                                              "pool_kernel": detector.resolved_.pool_kernel}
    assert "strictly above the threshold" in info["protocol"]["decision"] and info["protocol"]["image_size"] == SIZE
    assert info["params"] == detector.get_params()
    assert info["limits"] == {"max_upload_bytes": 2**20, "max_batch": 12, "max_pixels": None}


def test_page_and_its_files_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="threshold"' in page.text and 'id="files"' in page.text
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        response = client.get(f"/static/{name}")
        assert response.status_code == 200 and kind in response.headers["content-type"]


def test_predict_several_files_scores_equal_the_models(client, detector, tmp_path, monkeypatch):
    # different sizes and formats: each is read as read_image reads a file and resized by the model
    blobs = {f"img{i}.{fmt.lower()}": image_bytes(i, (SIZE + 13 * i, SIZE + 7 * i), fmt)
             for i, fmt in enumerate(["PNG", "JPEG", "PNG", "BMP", "TIFF", "PNG", "PNG", "PNG", "JPEG", "PNG"])}
    calls = []
    score_batch = detector.score_batch
    monkeypatch.setattr(detector, "score_batch", lambda images: calls.append(len(images)) or score_batch(images))
    response = client.post("/predict", files=[upload(n, b, "application/octet-stream") for n, b in blobs.items()])
    assert response.status_code == 200, response.text
    body = response.json()
    assert calls == [8, 2]  # one request of 10 images: scored in batches of the model's batch size
    monkeypatch.undo()
    assert [r["filename"] for r in body["results"]] == list(blobs)
    for name, data in blobs.items():
        (tmp_path / name).write_bytes(data)
    # the model's own path: read_image on the files, its preprocess (resize), its score
    expected = detector.score(torch.cat([detector.preprocess(read_image(tmp_path / n)) for n in blobs]))
    scores = np.array([r["score"] for r in body["results"]])
    np.testing.assert_allclose(scores, expected.image_scores.double().numpy(), rtol=1e-5)
    decisions = detector.calibration_.decide(scores)
    assert [r["anomalous"] for r in body["results"]] == decisions.tolist()
    assert [r["decision"] for r in body["results"]] == ["anomalous" if d else "normal" for d in decisions]
    assert all(r["threshold"] == detector.threshold_ and r["model"] == "padim" for r in body["results"])
    assert body["threshold"] == detector.threshold_ and "overlay_png" not in body["results"][0]


def test_decisions_come_from_the_calibration(client, detector, monkeypatch):
    # a calibration whose threshold sits between two images' scores: the service says what decide says
    blobs = [image_bytes(1), image_bytes(2)]
    scores = [r["score"] for r in client.post("/predict", files=[upload("a.png", blobs[0]),
                                                                 upload("b.png", blobs[1])]).json()["results"]]
    middle = Calibration.from_normal_scores([min(scores), max(scores)], 0.5, "test")
    assert middle.threshold == min(scores)
    monkeypatch.setattr(detector, "calibration_", middle)
    body = client.post("/predict", files=[upload("a.png", blobs[0]), upload("b.png", blobs[1])]).json()
    assert [r["anomalous"] for r in body["results"]] == middle.decide(scores).tolist() == [
        s > middle.threshold for s in scores]
    assert body["threshold"] == middle.threshold
    assert client.get("/model").json()["threshold"] == middle.threshold  # /model describes the rule in use


def test_overlay_is_a_png_of_the_model_size(client):
    response = client.post("/predict?overlay=true", files=[upload("a.png", image_bytes(3, (100, 80)))])
    result = response.json()["results"][0]
    overlay = Image.open(io.BytesIO(base64.b64decode(result["overlay_png"])))
    assert overlay.format == "PNG" and overlay.size == (SIZE, SIZE) and overlay.mode == "RGB"


def test_model_without_calibration_gives_scores_without_decisions(detector):
    uncalibrated = copy.copy(detector)
    uncalibrated.calibration_ = None
    with TestClient(create_app(uncalibrated)) as client:
        info = client.get("/model").json()
        assert info["threshold"] is None and info["normal_scores"] == [] and info["target_far"] is None
        body = client.post("/predict?overlay=true", files=[upload("a.png", image_bytes(4))]).json()
    result = body["results"][0]
    assert result["anomalous"] is None and result["decision"] is None and result["threshold"] is None
    assert np.isfinite(result["score"]) and result["overlay_png"]


# ------------------------------------------------------------------ refused input
def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (refused before any pixel is decoded)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = "omniadboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


BAD_REQUESTS = {
    # case: (request keyword arguments, status, words of the message, the file it names)
    "corrupt image": ({"files": [upload("cut.png", image_bytes(5)[:-30])]}, 422, "truncated", "cut.png"),
    "not an image": ({"files": [upload("notes.png", b"this is not a picture")]}, 422, "not an image", "notes.png"),
    "empty file": ({"files": [upload("empty.png", b"")]}, 422, "empty", "empty.png"),
    "second file bad": ({"files": [upload("good.png", image_bytes(6)), upload("bad.jpg", b"\xff\xd8\xff junk")]},
                        422, "bad.jpg", "bad.jpg"),
    "text content type": ({"files": [upload("a.txt", b"hello", "text/plain")]}, 415, "not an image type", "a.txt"),
    "pdf content type": ({"files": [upload("a.pdf", b"%PDF-1.4", "application/pdf")]}, 415, "application/pdf",
                         "a.pdf"),
    "multipart without a boundary": ({"content": b"x", "headers": {"content-type": "multipart/form-data"}}, 400,
                                     "malformed multipart upload", None),
    "json body": ({"json": {"image": "a.png"}}, 415, "multipart/form-data", None),
    "no body": ({}, 415, "multipart/form-data", None),
    "no files field": ({"data": {"image": "x"}, "files": [("other", ("a.png", b"x", "image/png"))]}, 422,
                       "no images", None),
    "text in files field": ({"data": {"files": "a.png"}, "files": [("x", ("a.png", b"x", "image/png"))]}, 422,
                            "must hold files", None),
    "too many files": ({"files": [upload(f"{i}.png", image_bytes(i)) for i in range(13)]}, 413, "at most 12", None),
    "upload over the limit": ({"files": [upload("big.png", b"\0" * (2**20 + 1))]}, 413, "upload too large", None),
    "image over the decompression-bomb limit": ({"files": [upload("bomb.png", png_header_only(30000, 30000))]}, 413,
                                                "image too large", "bomb.png"),
    "16-bit tiff of negative values": ({"files": [upload("neg.tif", None, "image/tiff")]}, 422, "0..65535",
                                       "neg.tif"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_a_clear_4xx_and_the_service_keeps_answering(client, case):
    kwargs, status, words, filename = BAD_REQUESTS[case]
    if case == "16-bit tiff of negative values":
        buffer = io.BytesIO()
        Image.fromarray(np.array([[-5, 3], [1, 2]], dtype=np.int32)).save(buffer, format="TIFF")
        kwargs = {"files": [upload("neg.tif", buffer.getvalue(), "image/tiff")]}
    response = client.post("/predict", **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert words in body["detail"], body
    assert body["filename"] == filename
    assert_still_answers(client)


def test_upload_without_content_length_is_cut_off_at_the_limit(client):
    body, content_type = _multipart("big.png", b"\0" * (2**20 + 10))

    def chunks():  # a generator: httpx sends it chunked, without Content-Length
        for start in range(0, len(body), 65536):
            yield body[start:start + 65536]

    response = client.post("/predict", content=chunks(), headers={"content-type": content_type})
    assert response.status_code == 413 and "upload too large" in response.json()["detail"]
    assert_still_answers(client)


def test_max_pixels_refuses_large_images_before_decoding(detector):
    with TestClient(create_app(detector, max_pixels=SIZE * SIZE)) as client:
        assert client.post("/predict", files=[upload("fits.png", image_bytes(7))]).status_code == 200
        response = client.post("/predict", files=[upload("wide.png", image_bytes(7, (SIZE + 1, SIZE)))])
        assert response.status_code == 413
        assert response.json() == {"detail": f"wide.png: image too large ({SIZE + 1}x{SIZE} = "
                                             f"{(SIZE + 1) * SIZE} pixels; the limit is {SIZE * SIZE})",
                                   "filename": "wide.png"}


# ------------------------------------------------------------------ any model with the scoring interface
class MeanDetector:
    """Not an omniad detector: the interface the service needs, and nothing else (like an exported model)."""

    name = "mean"
    image_size = 16
    batch_size = 4

    def __init__(self, nan: bool = False) -> None:
        self.nan = nan
        self.calibration_ = Calibration.from_normal_scores([0.2, 0.4, 0.5, 0.6], 0.25, "four test images")

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        images = images[None] if images.dim() == 3 else images
        return torch.nn.functional.interpolate(images, size=(16, 16), mode="bilinear", antialias=True)

    def score(self, images: torch.Tensor) -> AnomalyScores:
        maps = self.preprocess(images).mean(1)
        scores = maps.flatten(1).mean(1)
        return AnomalyScores(scores * float("nan") if self.nan else scores, maps)


def test_serves_any_object_with_the_scoring_interface():
    with TestClient(create_app(MeanDetector())) as client:
        info = client.get("/model").json()
        assert info["name"] == "mean" and info["backbone"] is None and info["params"] is None
        assert info["protocol"] is None and info["image_size"] == 16
        white, black = io.BytesIO(), io.BytesIO()
        Image.new("RGB", (20, 20), "white").save(white, format="PNG")
        Image.new("RGB", (20, 20), "black").save(black, format="PNG")
        body = client.post("/predict?overlay=true", files=[upload("white.png", white.getvalue()),
                                                           upload("black.png", black.getvalue())]).json()
    assert [(r["score"], r["decision"]) for r in body["results"]] == [(1.0, "anomalous"), (0.0, "normal")]


def test_model_info_reads_the_protocol_an_exported_file_carries():
    model = MeanDetector()
    model.metadata = {"protocol": {"decision": "anomalous when the image score is strictly above the threshold",
                                   "score_tail": {"sigma": 4.0}}}
    model.backbone, model.get_params = "tf_efficientnet_lite0", lambda: {"image_size": 16}
    info = model_info(model)
    assert info["protocol"] == model.metadata["protocol"] and info["params"] == {"image_size": 16}
    assert info["backbone"] == "tf_efficientnet_lite0" and info["model_class"].endswith("MeanDetector")


def test_a_model_failure_is_a_500_naming_it_and_the_service_recovers():
    model = MeanDetector(nan=True)
    with TestClient(create_app(model)) as client:
        response = client.post("/predict", files=[upload("a.png", image_bytes(8))])
        assert response.status_code == 500
        assert "scoring failed" in response.json()["detail"] and "a.png" in response.json()["detail"]
        model.nan = False
        assert client.post("/predict", files=[upload("a.png", image_bytes(8))]).status_code == 200


# ------------------------------------------------------------------ batching across requests
class GatedModel:
    """Records the batches it is called with; the first call waits until released (so that jobs queue up)."""

    batch_size = 4

    def __init__(self) -> None:
        self.batches: list[list[float]] = []
        self.started, self.release = threading.Event(), threading.Event()

    def score(self, images: torch.Tensor) -> SimpleNamespace:
        if not self.batches:
            self.started.set()
            self.release.wait(10)
        values = images[:, 0, 0, 0]
        self.batches.append(values.tolist())
        if (values < 0).any():
            raise ValueError("negative image")
        return SimpleNamespace(image_scores=values * 2, anomaly_maps=images[:, 0])


def _images(*values: float) -> torch.Tensor:
    return torch.tensor(values).reshape(-1, 1, 1, 1).expand(-1, 3, 2, 2).clone()


def test_concurrent_jobs_are_joined_into_batches_and_split_back():
    model = GatedModel()
    scorer = BatchScorer(model)
    first = scorer.submit(_images(1))
    assert model.started.wait(10)
    waiting = [scorer.submit(_images(2, 3)), scorer.submit(_images(4)), scorer.submit(_images(5, 6))]
    model.release.set()
    results = [f.result(10) for f in [first, *waiting]]
    scorer.close()
    # the waiting jobs joined while they fit in the batch size (4): [2, 3] + [4], then [5, 6]
    assert model.batches == [[1.0], [2.0, 3.0, 4.0], [5.0, 6.0]]
    assert [r[0].tolist() for r in results] == [[2.0], [4.0, 6.0], [8.0], [10.0, 12.0]]
    assert list(scorer.batch_sizes) == [1, 3, 2] and (scorer.calls, scorer.images) == (3, 6)


def test_a_bad_job_fails_alone_when_joined_with_others():
    model = GatedModel()
    scorer = BatchScorer(model)
    first = scorer.submit(_images(1))
    assert model.started.wait(10)
    good, bad = scorer.submit(_images(2)), scorer.submit(_images(-1))
    model.release.set()
    assert first.result(10)[0].tolist() == [2.0] and good.result(10)[0].tolist() == [4.0]
    with pytest.raises(ValueError, match="negative image"):
        bad.result(10)
    scorer.close()
    assert scorer.submit(_images(3)).result(10)[0].tolist() == [6.0]  # a closed scorer restarts on demand
    scorer.close()


# ------------------------------------------------------------------ loading, the CLI, the missing extra
def test_cli_serve_loads_the_model_and_runs_the_app(detector, tmp_path, monkeypatch, capsys):
    detector.save(tmp_path / "model")
    ran = {}
    monkeypatch.setattr("omniad.serve.run", lambda app, host, port, log_level, threads: ran.update(
        app=app, host=host, port=port, log_level=log_level, threads=threads))
    assert main(["serve", "--model", str(tmp_path / "model"), "--port", "8123", "--max-batch", "3",
                 "--max-upload-mb", "0.5", "--max-megapixels", "0.25", "--threads", "1"]) == 0
    assert (ran["host"], ran["port"], ran["log_level"], ran["threads"]) == ("127.0.0.1", 8123, "info", 1)
    with TestClient(ran["app"]) as client:
        info = client.get("/model").json()
    assert info["limits"] == {"max_upload_bytes": 2**19, "max_batch": 3, "max_pixels": 250_000}
    assert info["threshold"] == detector.threshold_
    assert "serving on http://127.0.0.1:8123/" in capsys.readouterr().err


def test_load_model_reads_a_saved_bundle(detector, tmp_path):
    detector.save(tmp_path / "m")
    loaded = load_model(tmp_path / "m", device="cpu")
    assert model_info(loaded)["normal_scores"] == model_info(detector)["normal_scores"]


def test_missing_extra_is_a_clear_error(monkeypatch, capsys, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    with pytest.raises(ImportError, match=r'uvicorn, which is not installed: pip install "omniad\[serve\]"'):
        create_app(MeanDetector())
    assert main(["serve", "--model", str(tmp_path / "absent")]) == 2
    assert 'pip install "omniad[serve]"' in capsys.readouterr().err


def test_static_files_are_in_the_package():
    static = Path(__import__("omniad.serve.app", fromlist=["STATIC"]).STATIC)
    assert {p.name for p in static.iterdir()} >= {"index.html", "app.js", "style.css"}


def test_serves_an_exported_file_with_the_torch_models_scores(detector, tmp_path):
    pytest.importorskip("onnxruntime")
    from omniad.serve import load_model

    detector.export(tmp_path / "m.onnx", format="onnx")
    exported = load_model(tmp_path / "m.onnx")
    blobs = {f"x{i}.png": image_bytes(10 + i) for i in range(3)}  # at the model's size: uint8 in, no resize
    with TestClient(create_app(exported, max_upload_bytes=2**20, max_batch=12)) as onnx_client:
        body = onnx_client.post("/predict", files=[upload(n, b) for n, b in blobs.items()]).json()
        info = onnx_client.get("/model").json()
    for name, data in blobs.items():
        (tmp_path / name).write_bytes(data)
    expected = detector.score(torch.cat([detector.preprocess(read_image(tmp_path / n)) for n in blobs]))
    np.testing.assert_allclose([r["score"] for r in body["results"]], expected.image_scores.double().numpy(),
                               rtol=1e-4)
    assert info["threshold"] == pytest.approx(detector.threshold_)


def test_an_exported_graph_s_uploads_are_read_as_predict_reads_its_files(detector, tmp_path):
    pytest.importorskip("onnxruntime")
    from omniad import predict
    from omniad.serve.service import prepare_upload

    detector.export(tmp_path / "m.onnx", format="onnx")
    exported = load_model(tmp_path / "m.onnx")
    side = int(exported.image_size) * 3 // 2  # larger than the model: resized, in uint8 for the graph
    pixels = np.random.default_rng(3).integers(0, 256, (side, side + 7, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "big.png")
    upload_image = prepare_upload(exported, (tmp_path / "big.png").read_bytes(), "big.png")
    assert upload_image.dtype == torch.uint8
    assert torch.equal(upload_image, read_image(tmp_path / "big.png", exported.image_size, dtype=torch.uint8))
    with TestClient(create_app(exported, max_upload_bytes=2**22, max_batch=4)) as onnx_client:
        body = onnx_client.post("/predict?overlay=true", files=[upload("big.png", (tmp_path / "big.png")
                                                                      .read_bytes())]).json()
    assert body["results"][0]["score"] == pytest.approx(predict(exported, [tmp_path / "big.png"]).scores[0],
                                                        rel=1e-6)
    assert Image.open(io.BytesIO(base64.b64decode(body["results"][0]["overlay_png"]))).size == (
        exported.image_size, exported.image_size)
