"""The fast path without a separate step: a bundle's graph built, checked and cached on first use, reused while the
bundle is unchanged, rebuilt when it changes; "auto" picks an installed runtime that passes its parity check."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_PADIM
from omniad import create_detector, load_model
from omniad.cli import RUNTIMES as CLI_RUNTIMES
from omniad.data import MVTecDataset
from omniad.export import ExportedDetector, ExportError
from omniad.fastpath import RUNTIMES, cache_folder, load_fast
from omniad.prediction import predict

HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
pytestmark = pytest.mark.skipif(not (HAS_ONNX and HAS_OPENVINO), reason="needs omniad[export] and omniad[openvino]")
SIZE = TINY_PADIM["image_size"]
COMMON = TINY_PADIM


@pytest.fixture(scope="module")
def bundle(padim_bundle, tmp_path_factory):
    """A copy of the shared bundle: its .fast/ cache is this module's own."""
    import shutil

    return Path(shutil.copytree(padim_bundle, tmp_path_factory.mktemp("fast") / "model"))


@pytest.fixture(scope="module")
def images(synthetic_root):
    test = MVTecDataset(synthetic_root, split="test", image_size=SIZE)
    return torch.stack([test[i].image for i in range(len(test))])


def test_the_cli_offers_the_runtimes_of_the_library():
    assert CLI_RUNTIMES == RUNTIMES


def test_first_use_builds_and_caches_a_graph_that_scores_as_torch(bundle, images):
    model = load_fast(bundle, "onnxruntime")
    assert isinstance(model, ExportedDetector) and model.format == "onnx"
    assert "built" in model.runtime_note
    folder = cache_folder(bundle)
    assert (folder / "onnxruntime.onnx").is_file() and (folder / "onnxruntime.key.json").is_file()
    torch_scores = load_model(bundle).score(images).image_scores.numpy()
    np.testing.assert_allclose(model.score(images).image_scores.numpy(), torch_scores, rtol=1e-4)
    again = load_fast(bundle, "onnxruntime")
    assert "cached" in again.runtime_note
    assert again.calibration_.threshold == pytest.approx(load_model(bundle).calibration_.threshold)


def test_a_changed_bundle_is_not_scored_by_the_old_graph(bundle, synthetic_root, tmp_path):
    other = tmp_path / "model"
    train = MVTecDataset(synthetic_root, split="train", image_size=SIZE)
    create_detector("padim", **COMMON).fit(train).save(other)
    load_fast(other, "onnxruntime")
    key = json.loads((cache_folder(other) / "onnxruntime.key.json").read_text())
    create_detector("padim", **{**COMMON, "seed": 1}).fit(train).save(other)  # saved again: another model
    rebuilt = load_fast(other, "onnxruntime")
    assert "built" in rebuilt.runtime_note
    assert json.loads((cache_folder(other) / "onnxruntime.key.json").read_text())["bundle_sha256"] != \
        key["bundle_sha256"]
    expected = load_model(other).calibration_.threshold
    assert rebuilt.calibration_.threshold == pytest.approx(expected)


def test_auto_takes_openvino_and_says_so_in_the_prediction(bundle, images):
    model = load_model(bundle, runtime="auto")
    assert isinstance(model, ExportedDetector) and model.format == "openvino"
    result = predict(model, images)
    assert result.runtime.startswith("openvino f32") and "auto" in result.runtime
    assert predict(load_model(bundle), images).runtime == "torch"


def test_auto_falls_back_to_torch_when_the_graph_cannot_be_exported(synthetic_root, tmp_path):
    train = MVTecDataset(synthetic_root, split="train", image_size=SIZE)
    path = tmp_path / "tiled"
    create_detector("padim", **{**COMMON, "tile_size": 32}).fit(train).save(path)
    model = load_fast(path, "auto")
    assert not isinstance(model, ExportedDetector) and model.runtime_note.startswith("torch (auto")
    with pytest.raises(ExportError, match="tiled"):
        load_fast(path, "openvino")


def test_an_exported_file_refuses_another_runtime(bundle, tmp_path):
    file = load_fast(bundle, "onnxruntime").path
    with pytest.raises(ValueError, match="runs on onnxruntime"):
        load_model(file, runtime="openvino")
    with pytest.raises(ValueError, match="unknown runtime"):
        load_fast(bundle, "tensorrt")


def test_a_precision_runs_the_cached_graph_on_openvino_alone(bundle, images, tmp_path, capsys):
    from omniad.cli import PRECISIONS as CLI_PRECISIONS
    from omniad.cli import main
    from omniad.export import PRECISIONS

    assert CLI_PRECISIONS == PRECISIONS
    f32 = load_fast(bundle, "openvino")
    model = load_fast(bundle, "auto", precision="bf16")  # auto: OpenVINO, the one runtime that takes the hint
    assert isinstance(model, ExportedDetector) and model.format == "openvino" and model.path == f32.path
    # the hint as compiled: bfloat16, or f32 on a CPU without bf16 (OpenVINO then keeps f32)
    assert model.runtime.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() in ("bf16", "f32")
    assert model.runtime_note.startswith("openvino bf16") and "scores move" in model.runtime_note
    assert f32.runtime.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() == "f32"
    # in bf16 (where the CPU has it) the scores stay close to the f32 graph's
    np.testing.assert_allclose(model.score(images).image_scores, f32.score(images).image_scores, rtol=0.1)
    assert load_model(f32.path, precision="bf16").runtime_note.startswith("openvino bf16")
    for runtime in ("onnxruntime", "torch"):
        with pytest.raises(ValueError, match=f"precision 'bf16' is OpenVINO's inference hint: runtime '{runtime}'"):
            load_fast(bundle, runtime, precision="bf16")
    with pytest.raises(ValueError, match="precision must be one of f32, bf16, f16"):
        load_fast(bundle, "openvino", precision="int4")
    with pytest.raises(ValueError, match="is an ONNX file"):
        load_model(load_fast(bundle, "onnxruntime").path, precision="bf16")
    with pytest.raises(ValueError, match="give runtime 'openvino' or 'auto'"):
        load_model(bundle, precision="bf16")
    files = [tmp_path / "x.png"]
    from PIL import Image

    Image.fromarray((images[0].permute(1, 2, 0) * 255).round().byte().numpy()).save(files[0])
    assert main(["predict", "--model", str(bundle), str(files[0]), "--out", str(tmp_path / "out"),
                 "--precision", "bf16", "--no-overlays"]) == 0
    assert json.loads((tmp_path / "out" / "results.json").read_text())["runtime"].startswith("openvino bf16")
