"""INT8: calibrated on the model's own held-out normals, the threshold re-set on the INT8 scores, the change stated
and bounded (past the bound nothing is written), the wrong training data refused."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from omniad import load_model
from omniad.cli import main
from omniad.data import MVTecDataset
from omniad.quantize import DEFAULT_MAX_SCORE_CHANGE, QuantizationError, quantize_model

pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("nncf", "openvino", "onnx")), reason="needs omniad[int8,export]")
SIZE = 64  # the shared padim_bundle's


@pytest.fixture(scope="module")
def fitted(synthetic_root, padim_bundle):
    train = MVTecDataset(synthetic_root, split="train", image_size=SIZE)
    return load_model(padim_bundle), train, padim_bundle


def test_int8_graph_rescores_its_held_out_normals_and_states_the_change(fitted, tmp_path, synthetic_root):
    detector, train, _ = fitted
    report = quantize_model(detector, train, tmp_path / "q.xml", max_score_change=10.0)
    model = load_model(tmp_path / "q.xml")
    assert model.metadata["precision"] == "int8" and model.runtime_note.startswith("openvino int8 ")
    stated = model.metadata["quantization"]
    assert stated["max_score_change"] == pytest.approx(report.max_score_change) and report.max_score_change > 0
    n = detector.calibration_.normal_scores.size
    assert report.calibration_images == n == model.calibration_.normal_scores.size
    # the threshold is the INT8 graph's own: re-set on its scores of the held-out images, at the same target
    assert model.calibration_.target_far == detector.calibration_.target_far
    assert model.calibration_.threshold == pytest.approx(report.threshold_int8)
    test = MVTecDataset(synthetic_root, split="test", image_size=SIZE)
    images = torch.stack([test[i].image for i in range(len(test))])
    int8 = model.score(images).image_scores.numpy()
    f32 = detector.score(images).image_scores.numpy()
    assert np.isfinite(int8).all() and np.corrcoef(int8, f32)[0, 1] > 0.9


def test_past_the_bound_nothing_is_written(fitted, tmp_path):
    detector, train, _ = fitted
    with pytest.raises(QuantizationError, match="past the bound"):
        quantize_model(detector, train, tmp_path / "q.xml", max_score_change=1e-9)
    assert list(tmp_path.iterdir()) == []


def test_other_training_data_is_refused(fitted, tmp_path):
    detector, train, _ = fitted
    fewer = torch.stack([train[i].image for i in range(len(train) - 3)])
    with pytest.raises(QuantizationError, match="fitted on"):
        quantize_model(detector, fewer, tmp_path / "q.xml")
    with pytest.raises(ValueError, match=r"\*.xml"):
        quantize_model(detector, train, tmp_path / "q.onnx")


def test_the_cli_writes_the_graph_and_its_default_bound_is_the_library_s(fitted, tmp_path, synthetic_root, capsys):
    import omniad.cli as cli

    assert f"default={DEFAULT_MAX_SCORE_CHANGE}," in open(cli.__file__).read()
    _, _, path = fitted
    code = main(["quantize", "--model", str(path), "--data", str(synthetic_root), "--out", str(tmp_path / "q.xml"),
                 "--max-score-change", "10"])
    assert code == 0 and "INT8 padim written" in capsys.readouterr().out
    assert json.loads(json.dumps(load_model(tmp_path / "q.xml").metadata))["precision"] == "int8"
