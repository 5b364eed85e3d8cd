"""BaseDetector: hyper-parameters, input handling, label-free fitting, the calibration hold-out, seeding."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from omniad import registry
from omniad.calibration import threshold_at_far
from omniad.methods.base import BaseDetector, NotFittedError
from omniad.registry import create_detector, detector_class, register_detector
from omniad.types import Sample

SIZE = 16


class _SpyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros(3, 1, 1))
        self.register_buffer("noise", torch.zeros(()))


class _Spy(BaseDetector):
    """Records what ``train_features`` receives; score = distance to the mean training colour (+ seeded noise).

    Args:
        offset: added to every map value.
        **common: see ``BaseDetector``.
    """

    defaults = {"sigma": 0.0, "image_pooling": "max"}

    def __init__(self, *, offset: float = 0.0, **common):
        super().__init__(**common)
        self.offset = offset

    def build_frozen(self, pretrained):
        pass  # no backbone: the features are the images themselves

    def features(self, images):
        return images

    def train_features(self, features):
        self.received = list(features.unbind(0))
        self.net_ = _SpyNet()
        self.net_.mean.copy_(features.mean(dim=(0, 2, 3)).view(3, 1, 1))
        self.net_.noise.copy_(torch.rand(()))  # global RNG: seeded by fit_features

    def score_features(self, features):
        return (features - self.net_.mean).abs().mean(1) + self.resolved_.offset + self.net_.noise

    def modules(self):
        return {"net": self.net_}

    def build(self, meta):
        self.net_ = _SpyNet()


@pytest.fixture()
def spy():
    """Register the spy for one test only, so registry-wide tests never see it."""
    register_detector("_spy")(_Spy)
    yield "_spy"
    registry._REGISTRY.pop("_spy", None)


def _constant_images(n: int) -> torch.Tensor:
    """Image i is the constant (i + 1) / (n + 1): its value identifies it."""
    return torch.stack([torch.full((3, SIZE, SIZE), (i + 1) / (n + 1)) for i in range(n)])


def _ids(images) -> set[float]:
    return {round(float(im[0, 0, 0]), 6) for im in images}


def _make(name, **kw):
    return create_detector(name, **{"device": "cpu", "progress": False, "batch_size": 4, "image_size": SIZE, **kw})


def test_score_before_fit_raises_clear_error(spy):
    det = _make(spy)
    with pytest.raises(NotFittedError, match="_Spy is not fitted yet: call fit"):
        det.score(torch.rand(1, 3, SIZE, SIZE))
    with pytest.raises(NotFittedError, match="not fitted"):
        det.predict(torch.rand(1, 3, SIZE, SIZE))
    with pytest.raises(NotFittedError, match="not fitted"):
        det.save("unused")


def test_params_round_trip_and_documentation():
    det = create_detector("patchcore", stages=(1, 2), coreset_ratio=0.05, seed=7, target_far=0.02, device="cpu")
    params = det.get_params()
    assert params["stages"] == [1, 2] and params["seed"] == 7 and params["coreset_ratio"] == 0.05
    again = create_detector("patchcore", **params)
    assert again.get_params() == params
    assert again.stages == [1, 2]  # stored as given (scikit-learn's rule)
    copy = det.clone()
    assert copy is not det and copy.get_params() == params and not hasattr(copy, "fitted_")
    assert det.set_params(coreset_ratio=0.2) is det and det.get_params()["coreset_ratio"] == 0.2
    with pytest.raises(ValueError, match="unknown parameters \\['nope'\\]"):
        det.set_params(nope=1)
    cls = detector_class("patchcore")
    names = cls.param_names()
    for method_param in ("stages", "coreset_ratio", "projection_dim"):
        assert method_param in names
    for common_param in ("backbone", "weights", "seed", "calibration_fraction", "target_far", "device"):
        assert common_param in names
    assert "common" not in names and "self" not in names
    defaults = cls.param_defaults()
    assert defaults["coreset_ratio"] == 0.1 and defaults["seed"] == 0 and defaults["max_bank_size"] is None
    helps = cls.param_help()
    assert set(helps) == set(names)
    assert "greedy" in helps["coreset_candidates"]  # continuation lines are joined
    assert all(helps[n] for n in names), {n for n in names if not helps[n]}
    assert "repeatable" in helps["seed"]
    assert repr(det).startswith("PatchCore(") and "coreset_ratio=0.2" in repr(det) and "batch_size" not in repr(det)


def test_resolved_params_are_normalised_and_checked_before_derive_params():
    # JSON and YAML give lists and 3.0: the resolved values are tuples of ints, whatever the spelling
    r = create_detector("revdist", preset="cpu", stages=[1.0, 2], image_size=[64, 96.0]).resolved_params()
    assert r["stages"] == (1, 2) and all(type(s) is int for s in r["stages"])
    assert r["image_size"] == (64, 96) and type(r["image_size"]) is tuple
    assert r["decoder_blocks"] == (1, 1)  # the preset's depths follow the 2 stages (derive_params got a tuple)
    assert type(create_detector("padim", image_size=64.0).resolved_params()["image_size"]) is int
    # a bad item is refused by name before derive_params reads it (not a bare int() or comparison error)
    with pytest.raises(ValueError, match=r"revdist: stages\[0\] must be a number"):
        create_detector("revdist", preset="cpu", stages=["a"]).resolved_params()
    with pytest.raises(ValueError, match=r"mkd: crop_scale\[1\] must be a number"):
        create_detector("mkd", preset="cpu", crop_scale=(0.1, "x")).resolved_params()
    # values derive_params fills are checked too
    assert create_detector("mkd", preset="cpu", n_normal_classes=3).resolved_params()["n_prototypes"] == 6
    with pytest.raises(ValueError, match="musc: aggregation_degrees must not be empty"):
        create_detector("musc", aggregation_degrees=()).resolved_params()


def test_fit_accepts_tensor_list_and_samples_and_never_passes_labels(spy):
    images = _constant_images(6)
    for data in (
        images,
        list(images),
        [Sample(im, torch.zeros(SIZE, SIZE), label=1, category="screw", defect_type="hole") for im in images],
    ):
        det = _make(spy, calibration_fraction=0.0).fit(data)
        assert det.fitted_ is True
        assert len(det.received) == 6
        for item in det.received:
            assert type(item) is torch.Tensor and item.shape == (3, SIZE, SIZE)
        assert _ids(det.received) == _ids(images)


def test_fit_rejects_empty_data(spy):
    with pytest.raises(ValueError, match="at least one training image"):
        _make(spy).fit([])


def test_calibration_holdout_is_never_trained_on(spy):
    images = _constant_images(20)
    det = _make(spy, calibration_fraction=0.25, target_far=0.1).fit(images)
    trained = _ids(det.received)
    assert len(trained) == 15
    held_out = torch.stack([im for im in images if round(float(im[0, 0, 0]), 6) not in trained])
    assert len(held_out) == 5
    expected = threshold_at_far(det.score(held_out).image_scores.numpy(), 0.1)
    assert det.threshold_ == expected == det.calibration_.threshold
    assert det.calibration_.target_far == 0.1 and "held out" in det.calibration_.source
    assert sorted(det.calibration_.normal_scores.tolist()) == pytest.approx(
        sorted(det.score(held_out).image_scores.tolist()))
    decisions = det.predict(images)
    assert decisions.dtype == torch.bool and decisions.shape == (20,)
    assert torch.equal(decisions, det.score(images).image_scores > det.threshold_)


def test_no_calibration_gives_nan_threshold_and_predict_refuses(spy):
    det = _make(spy, calibration_fraction=0.0).fit(_constant_images(5))
    assert len(det.received) == 5
    assert math.isnan(det.threshold_)
    with pytest.raises(NotFittedError, match="no calibrated threshold"):
        det.predict(torch.rand(1, 3, SIZE, SIZE))
    # explicit calibration afterwards enables predict
    det.calibrate(_constant_images(10), target_far=0.2)
    assert math.isfinite(det.threshold_)
    assert det.predict(torch.rand(2, 3, SIZE, SIZE)).shape == (2,)


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        (torch.rand(2, 1, SIZE, SIZE), ValueError, r"\(B, 3, H, W\), got \(2, 1, 16, 16\)"),
        (torch.rand(SIZE, SIZE), ValueError, r"\(B, 3, H, W\), got \(16, 16\)"),
        (torch.randint(0, 255, (2, 3, SIZE, SIZE)), TypeError, "float images .* torch.int64"),
        ([torch.rand(3, SIZE, SIZE)], TypeError, "got list"),
        (torch.rand(2, 3, SIZE, SIZE) * 255, ValueError, r"values in \[0, 1\], got values in \[.*, 25\d"),
        (torch.full((1, 3, SIZE, SIZE), float("nan")), ValueError, "values in \\[0, 1\\]"),
    ],
)
def test_score_validates_input(spy, bad, error, match):
    det = _make(spy, calibration_fraction=0.0).fit(_constant_images(3))
    with pytest.raises(error, match=match):
        det.score(bad)


def test_score_batches_and_single_images(spy):
    det = _make(spy, calibration_fraction=0.0, batch_size=3).fit(_constant_images(4))
    x = torch.rand(7, 3, SIZE, SIZE)
    full = det.score(x)
    assert full.image_scores.shape == (7,) and full.anomaly_maps.shape == (7, SIZE, SIZE)
    one = det.score(x[2])  # a single (3, H, W) image
    torch.testing.assert_close(one.image_scores, full.image_scores[2:3])
    ds = det.score_dataset(list(x))
    torch.testing.assert_close(ds.image_scores, full.image_scores)
    # other sizes are resized the way the readers resize, the same for every method
    from omniad.data.images import resize_image

    big = torch.rand(2, 3, 40, 24)
    torch.testing.assert_close(det.score(big).image_scores, det.score(resize_image(big, SIZE)).image_scores)
    assert det.score(big).anomaly_maps.shape == (2, SIZE, SIZE)


def test_seed_makes_fit_repeatable(spy):
    images = _constant_images(8)
    a = _make(spy, seed=3).fit(images)
    b = _make(spy, seed=3).fit(images)
    c = _make(spy, seed=4).fit(images)
    x = torch.rand(3, 3, SIZE, SIZE)
    assert torch.equal(a.score(x).image_scores, b.score(x).image_scores)
    assert a.threshold_ == b.threshold_ and _ids(a.received) == _ids(b.received)
    assert not torch.equal(a.score(x).image_scores, c.score(x).image_scores)


def test_seed_makes_a_real_detector_repeatable():
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    kw = dict(weights="random", stages=(1, 2), n_features=16, calibration_fraction=0.0)
    a = _make("padim", **kw).fit(images).score(images[:2])
    b = _make("padim", **kw).fit(images).score(images[:2])
    assert torch.equal(a.image_scores, b.image_scores) and torch.equal(a.anomaly_maps, b.anomaly_maps)


def test_spy_fixture_unregisters(spy):
    assert spy in registry.list_detectors()


def test_registry_after_spy_is_clean():
    assert "_spy" not in registry.list_detectors()


def test_post_processing_changes_on_a_fitted_detector_take_effect_and_drop_the_calibration(spy):
    det = _make(spy, calibration_fraction=0.25).fit(_constant_images(8))
    x = torch.rand(3, 3, SIZE, SIZE)
    before = det.score(x)
    assert det.calibration_ is not None
    det.set_params(image_pooling="top1", top_fraction=0.5)
    after = det.score(x)
    top_half = before.anomaly_maps.flatten(1).topk(SIZE * SIZE // 2, dim=1).values.mean(1)
    torch.testing.assert_close(after.image_scores, top_half)  # the same maps, pooled the new way
    assert det.calibration_ is None  # the old threshold does not fit the new scores
    det.set_params(offset=5.0)  # a training parameter: only at the next fit
    torch.testing.assert_close(det.score(x).image_scores, after.image_scores)


def test_extract_computes_features_once_per_image_in_order_on_the_cpu(spy):
    images = _constant_images(7)
    det = _make(spy, batch_size=3)
    seen = []
    original = det.features
    det.features = lambda batch: seen.append(batch.shape[0]) or original(batch)
    cache = det.extract(images)
    assert seen == [3, 3, 1] and cache.device.type == "cpu" and cache.dtype == torch.float32
    torch.testing.assert_close(cache, images)  # the spy's features are the images, in order
    with pytest.raises(ValueError, match="no images"):
        det.extract([])
