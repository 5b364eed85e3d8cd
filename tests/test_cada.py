"""CADA and its variants: alignment maths on hand cases, the regressor, where the targets come from, wrapping every
registered base, save/load, the label-free API, the (u, sigma) targets and the class-aware variants A and B."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn

from omniad import list_detectors, load_detector
from omniad.align import CADA, CADARegressor, ClassAwareA, ClassAwareB, align_maps, class_statistics, map_moments
from omniad.backbone import Backbone
from omniad.methods.base import BaseDetector, NotFittedError
from omniad.methods.cada.alignment import image_statistics, targets_from_moments
from omniad.postprocess import top_fraction_mean
from omniad.registry import _REGISTRY, detector_class

SIZE = 32
COMMON = dict(weights="random", image_size=SIZE, batch_size=8, device="cpu", progress=False, seed=0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread avoids oversubscription on a shared 2-core machine (30x slower otherwise)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- a tiny base with mismatched types
class _FakeNet(nn.Module):
    def __init__(self, backbone: Backbone | None, scale: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("scale", torch.tensor(float(scale)))

    def forward(self, images: Tensor) -> Tensor:
        if self.backbone is not None:
            self.backbone(images)  # a real base runs its backbone while scoring: CADA taps it
        return images.mean(1) * self.scale


class FakeBase(BaseDetector):
    """Anomaly map = grey level x scale: bright types score high everywhere, as mismatched real bases do.

    Records which images it trained on and scored (corner pixel = image id), for the spy tests.

    Args:
        scale: map scale.
        with_backbone: expose a frozen ``backbone_`` saved inside the base's modules.
        **common: see BaseDetector.
    """

    defaults = {"sigma": 0.0, "image_pooling": "top1"}

    def __init__(self, *, scale: float = 10.0, with_backbone: bool = True, **common: Any) -> None:
        super().__init__(**common)
        self.scale = scale
        self.with_backbone = with_backbone
        self.fit_ids: list[int] = []
        self.scored_ids: list[tuple[str, int]] = []
        self.phase = "fit"
        self.fit_calls = 0

    def build_frozen(self, pretrained: bool) -> None:
        self.backbone_ = Backbone(self.backbone, (1, 2), "random") if self.with_backbone else None

    def features(self, images: Tensor) -> Tensor:
        return images

    def train_features(self, images: Tensor) -> None:
        self.fit_calls += 1
        self.fit_ids = [_image_id(im) for im in images]
        self.net_ = _FakeNet(self.backbone_, self.scale).to(self.device_)

    def score_features(self, images: Tensor) -> Tensor:
        self.scored_ids += [(self.phase, _image_id(im)) for im in images]
        return self.net_(images)

    def modules(self) -> dict[str, nn.Module]:
        return {"net": self.net_}

    def build(self, meta: dict[str, Any]) -> None:
        self.net_ = _FakeNet(self.backbone_, self.scale).to(self.device_)


def _image_id(image: Tensor) -> int:
    return int(round(float(image[0, 0, 0]) * 1000))


def _images(n: int, kind: str, defect: bool, seed: int, first_id: int = 0) -> Tensor:
    """Type "dark" (grey ~0.2, horizontal stripes) or "bright" (~0.7, vertical); a defect = a 6x6 spot of +0.25."""
    g = torch.Generator().manual_seed(seed)
    level = 0.2 if kind == "dark" else 0.7
    coords = torch.arange(SIZE, dtype=torch.float32)
    stripes = 0.05 * torch.sin(coords / 2.0)
    pattern = stripes.view(-1, 1).expand(SIZE, SIZE) if kind == "dark" else stripes.view(1, -1).expand(SIZE, SIZE)
    out = level + pattern + 0.02 * torch.randn(n, 1, SIZE, SIZE, generator=g)
    out = out.expand(n, 3, SIZE, SIZE).clone()
    if defect:
        for i in range(n):
            y, x = torch.randint(4, SIZE - 10, (2,), generator=g).tolist()
            out[i, :, y : y + 6, x : x + 6] += 0.25
    out = out.clamp(0, 1)
    out[:, 0, 0, 0] = (first_id + torch.arange(n, dtype=torch.float32)) / 1000  # the spy's image id
    return out


@pytest.fixture(scope="module")
def two_types():
    train = torch.cat([_images(16, "dark", False, 1, 1), _images(16, "bright", False, 2, 101)])
    test = torch.cat([
        _images(6, "dark", False, 3, 201), _images(6, "dark", True, 4, 301),
        _images(6, "bright", False, 5, 401), _images(6, "bright", True, 6, 501),
    ])
    labels = np.array([0] * 6 + [1] * 6 + [0] * 6 + [1] * 6)
    train_types = ["dark"] * 16 + ["bright"] * 16
    test_types = ["dark"] * 12 + ["bright"] * 12
    return train, train_types, test, labels, test_types


@pytest.fixture
def fake_registered(monkeypatch):
    """FakeBase registered under a test-only name for the duration of one test (load_detector needs a name)."""
    monkeypatch.setitem(_REGISTRY, "fake_cada_base", FakeBase)
    monkeypatch.setattr(FakeBase, "name", "fake_cada_base", raising=False)
    return "fake_cada_base"


def _cada(**params) -> CADA:
    return CADA(**{**COMMON, "iterations": 150, "calibration_fraction": 0.0, **params})


# ----------------------------------------------------------------------------- maths on hand cases
def test_align_maps_hand_case():
    maps = torch.tensor([[[1.0, 2.0], [3.0, 5.0]], [[0.0, 0.5], [1.0, 1.5]]])
    u, gamma = torch.tensor([1.0, 0.5]), torch.tensor([3.0, 1.0])
    aligned = align_maps(maps, u, gamma)
    expected = torch.tensor([[[0.0, 0.5], [1.0, 2.0]], [[-1.0, 0.0], [1.0, 2.0]]])
    torch.testing.assert_close(aligned, expected)
    # gamma <= u would flip the map: the spread is clamped from below
    clamped = align_maps(maps[:1], torch.tensor([3.0]), torch.tensor([2.0]), min_spread=0.5)
    torch.testing.assert_close(clamped, (maps[:1] - 3.0) / 0.5)


def test_top_one_percent_score_of_an_aligned_map():
    amap = torch.zeros(1, 20, 20)  # 400 pixels -> top 1% = the 4 highest
    amap[0, 0, :6] = torch.tensor([9.0, 7.0, 5.0, 3.0, 1.0, 1.0])
    aligned = align_maps(amap, torch.tensor([1.0]), torch.tensor([3.0]))
    assert float(top_fraction_mean(aligned, 0.01)) == pytest.approx(((9 + 7 + 5 + 3) / 4 - 1) / 2)


def test_image_statistics_max_and_u_sigma():
    maps = torch.tensor([[[1.0, 3.0], [1.0, 3.0]]])  # mean 2, max 3, std 1
    torch.testing.assert_close(image_statistics(maps, "max"), torch.tensor([[2.0, 3.0]]))
    torch.testing.assert_close(image_statistics(maps, "u_sigma"), torch.tensor([[2.0, 5.0]]))
    with pytest.raises(ValueError, match="unknown CADA target"):
        image_statistics(maps, "median")


def test_class_statistics_pool_pixels_and_average_maxima():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(6, 4, 4, generator=g)
    cats = ["a", "b", "a", "a", "b", "b"]
    stats = class_statistics(map_moments(maps), cats, "max")
    stats_sigma = class_statistics(map_moments(maps), cats, "u_sigma")
    for c in ("a", "b"):
        pixels = maps[[i for i, k in enumerate(cats) if k == c]].double()
        assert stats[c][0] == pytest.approx(float(pixels.mean()))
        assert stats[c][1] == pytest.approx(float(pixels.flatten(1).max(1).values.mean()))
        assert stats_sigma[c][1] == pytest.approx(float(pixels.mean() + 3 * pixels.std(unbiased=False)))


def test_regressor_shapes_and_normalisation():
    net = CADARegressor(8, 2).eval()
    feats = torch.randn(5, 8, 6, 6)
    assert net(feats).shape == (5, 2)
    net.set_normalisation(torch.full((8,), 1.0), torch.full((8,), 2.0), torch.tensor([3.0, 4.0]),
                          torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(net(feats), net.forward_normalised(feats) * torch.tensor([0.5, 2.0])
                               + torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(net(feats), net(feats))  # eval: dropout off, deterministic
    assert net.conv.in_channels == net.conv.out_channels == 8  # 1 conv with the feature channels
    linears = [m for m in net.head if isinstance(m, nn.Linear)]
    assert [lin.out_features for lin in linears] == [256, 2]
    assert isinstance(net.head[0], nn.Dropout) and net.head[0].p == 0.25
    assert CADARegressor(8, 3)(feats).shape == (5, 3)  # the class-aware B classifier


def test_feature_reader_pools_large_maps_only():
    from omniad.methods.cada.base_reader import FeatureReader

    reader = FeatureReader(nn.Identity(), 0, shared=False, size=8)
    big, small = torch.rand(2, 5, 16, 16), torch.rand(2, 5, 4, 4)
    torch.testing.assert_close(reader._pool(big), torch.nn.functional.avg_pool2d(big, 2))
    assert reader._pool(small) is small


# ----------------------------------------------------------------------------- CADA behaviour
def test_cada_separates_types_the_base_confuses(two_types):
    train, _, test, labels, _ = two_types
    base = FakeBase(**COMMON, calibration_fraction=0.0).fit(train)
    base_auroc = roc_auc_score(labels, base.score(test).image_scores.numpy())
    cada = _cada(base=FakeBase(**COMMON)).fit(train)
    result = cada.score(test)
    assert result.anomaly_maps.shape == (len(test), SIZE, SIZE)
    cada_auroc = roc_auc_score(labels, result.image_scores.numpy())
    assert base_auroc < 0.8 and cada_auroc > 0.95, (base_auroc, cada_auroc)
    # the aligned map is the base's map under the predicted (u, gamma)
    maps, features = cada.features(test[:4])
    stats = cada.predict_statistics(features)
    torch.testing.assert_close(result.anomaly_maps[:4], align_maps(maps, stats[:, 0], stats[:, 1]))


def test_targets_come_from_the_training_maps_only(two_types, monkeypatch):
    train, *_ = two_types
    base = FakeBase(**COMMON)
    cada = _cada(base=base, calibration_fraction=0.25)
    original = CADA.calibrate

    def spy_calibrate(self, *args, **kwargs):
        base.phase = "calibrate"
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CADA, "calibrate", spy_calibrate)
    cada.fit(train)
    all_ids = {_image_id(im) for im in train}
    fit_ids = set(base.fit_ids)
    target_ids = {i for phase, i in base.scored_ids if phase == "fit"}
    held_out = {i for phase, i in base.scored_ids if phase == "calibrate"}
    assert len(held_out) == 8 and held_out == all_ids - fit_ids  # 25% held out, never trained on
    assert target_ids == fit_ids  # targets: exactly the images the base was trained on
    assert np.isfinite(cada.threshold_) and np.isfinite(cada.base_.threshold_)
    assert cada.base_.calibration_fraction == 0.0


def test_calibration_uses_aligned_scores(two_types):
    train, *_ = two_types
    cada = _cada(base=FakeBase(**COMMON), calibration_fraction=0.25).fit(train)
    raw, aligned = cada.score_with_base(train)
    torch.testing.assert_close(aligned.image_scores, cada.score(train).image_scores)
    held = cada.calibration_.normal_scores
    assert cada.threshold_ == pytest.approx(float(held.max()))  # target_far 1% of 8 images: the maximum
    assert cada.base_.threshold_ == pytest.approx(float(cada.base_.calibration_.normal_scores.max()))
    assert not np.allclose(held, cada.base_.calibration_.normal_scores)


def test_u_sigma_targets(two_types):
    train, *_ = two_types
    cada = _cada(base=FakeBase(**COMMON), target="u_sigma").fit(train)
    maps = cada.base_.score(train).anomaly_maps
    flat = maps.flatten(1).double()
    expected = torch.stack([flat.mean(1), flat.mean(1) + 3 * flat.std(1, unbiased=False)], 1).float()
    torch.testing.assert_close(targets_from_moments(map_moments(maps), "u_sigma"), expected)
    # the head predicts (u, gamma - u): its target means are those of u and of 3 sigma
    torch.testing.assert_close(cada.regressor_.target_mean, torch.stack([expected[:, 0], expected[:, 1]
                               - expected[:, 0]], 1).mean(0))
    other = _cada(base=FakeBase(**COMMON)).fit(train)  # target="max" regresses the maximum instead
    spread = flat.max(1).values - flat.mean(1)
    assert float(other.regressor_.target_mean[1]) == pytest.approx(float(spread.mean()), rel=1e-5)


def test_prefitted_base_is_not_refitted(two_types):
    train, *_ = two_types
    base = FakeBase(**COMMON, calibration_fraction=0.0).fit(train)
    cada = _cada(base=base).fit(train)
    assert base.fit_calls == 1 and cada.base_ is base
    params = cada.get_params()
    assert params["base"] == base.name and params["base_params"]["scale"] == 10.0
    with pytest.raises(ValueError, match="base_params cannot be combined"):
        CADA(base=base, base_params={"scale": 2.0}).resolved_params()


def test_own_feature_backbone_when_the_base_has_none(two_types):
    train, _, test, labels, _ = two_types
    cada = _cada(base=FakeBase(**COMMON, with_backbone=False)).fit(train)
    assert not cada.reader_.shared and cada.reader_.stage == 3 and "features" in cada.modules()
    assert roc_auc_score(labels, cada.score(test).image_scores.numpy()) > 0.95


def test_fit_and_score_take_no_labels():
    for method in (CADA.fit, CADA.score, CADA.calibrate, CADA.score_with_base, CADA.extract, CADA.fit_features):
        params = set(inspect.signature(method).parameters)
        assert not {"labels", "categories", "category", "y"} & params, method.__name__
    assert "categories" in inspect.signature(ClassAwareA.fit).parameters
    assert "categories" in inspect.signature(ClassAwareA.score).parameters
    assert not {"class_aware_a", "class_aware_b"} & set(list_detectors())  # label users are not detectors


def test_bad_settings_fail_clearly():
    with pytest.raises(ValueError, match="target must be one of 'max', 'u_sigma'"):
        CADA(target="median").resolved_params()
    with pytest.raises(TypeError, match="base must be"):
        CADA(base=3).resolved_params()
    with pytest.raises(ValueError, match="iterations must be in"):
        CADA(iterations=0).resolved_params()
    with pytest.raises(NotFittedError):
        CADA(**COMMON).score(torch.rand(1, 3, SIZE, SIZE))
    with pytest.raises(ValueError, match="already wraps"):
        _cada(base="cada").fit(torch.rand(4, 3, SIZE, SIZE))
    with pytest.raises(ValueError, match="unknown parameters"):
        _cada(base="padim", base_params={"no_such": 1}).fit(torch.rand(4, 3, SIZE, SIZE))


# ----------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("with_backbone", [True, False])
def test_save_load_gives_identical_scores(two_types, fake_registered, tmp_path, with_backbone):
    train, _, test, *_ = two_types
    cada = CADA(**{**COMMON, "iterations": 50}, base=fake_registered, base_params={"scale": 7.0,
                "with_backbone": with_backbone}).fit(train)
    before = cada.score(test)
    cada.save(tmp_path / "m")
    loaded = load_detector(tmp_path / "m")
    after = loaded.score(test)
    torch.testing.assert_close(after.image_scores, before.image_scores, rtol=0, atol=0)
    torch.testing.assert_close(after.anomaly_maps, before.anomaly_maps, rtol=0, atol=0)
    assert loaded.get_params() == cada.get_params()
    assert loaded.threshold_ == pytest.approx(cada.threshold_)
    assert loaded.base_.threshold_ == pytest.approx(cada.base_.threshold_)
    assert loaded.base_.scale == 7.0 and loaded.reader_.shared == with_backbone


# ----------------------------------------------------------------------------- every registered base
# Each base runs with its own contract-test settings (``test_params``): a new method cannot be left out.
def _wrappable() -> list[str]:
    names = []
    for name in list_detectors():
        cls = detector_class(name)
        if issubclass(cls, BaseDetector) and not getattr(cls, "wraps_base", False) and cls.min_score_batch == 1:
            names.append(name)
    return names


def test_a_mutual_scorer_is_refused_as_a_base():
    with pytest.raises(ValueError, match="'musc' scores the images of a call against each other"):
        CADA(base="musc").fit(torch.rand(4, 3, 32, 32))


@pytest.mark.parametrize("name", _wrappable())
def test_wrapping_every_registered_base(name, two_types, tmp_path):
    train, _, test, *_ = two_types
    params = dict(detector_class(name).test_params)
    # the test settings are made for 64-px images: the 32-px ones are resized by the base's pre-processing
    cada = CADA(**{**COMMON, "image_size": 64, "iterations": 20, "calibration_fraction": 0.2}, base=name,
                base_params=params)
    cada.fit(train)
    raw, aligned = cada.score_with_base(test)
    assert aligned.image_scores.shape == (len(test),) and aligned.anomaly_maps.shape == (len(test), 64, 64)
    assert torch.isfinite(aligned.anomaly_maps).all() and np.isfinite(cada.threshold_)
    torch.testing.assert_close(raw.anomaly_maps, cada.base_.score(test).anomaly_maps, rtol=1e-5, atol=1e-5)
    cada.save(tmp_path / "m")
    torch.testing.assert_close(load_detector(tmp_path / "m").score(test).image_scores, aligned.image_scores,
                               rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- class-aware variants
def test_class_aware_a_uses_the_given_types(two_types):
    train, train_types, test, labels, test_types = two_types
    variant = ClassAwareA(**COMMON, base=FakeBase(**COMMON), calibration_fraction=0.25).fit(train, train_types)
    assert variant.classes_ == ["bright", "dark"] and np.isfinite(variant.threshold_)
    result = variant.score(test, test_types)
    assert roc_auc_score(labels, result.image_scores.numpy()) > 0.95
    maps = variant.base_.score(test[:2]).anomaly_maps
    u, gamma = variant.stats_["dark"]
    torch.testing.assert_close(result.anomaly_maps[:2], (maps - u) / (gamma - u))
    with pytest.raises(ValueError, match="needs the type"):
        variant.score(test)
    with pytest.raises(ValueError, match="unknown categories"):
        variant.score(test[:1], ["glass"])
    with pytest.raises(ValueError, match="one type label per training image"):
        ClassAwareA(**COMMON).fit(train, None)


def test_class_aware_b_predicts_the_type(two_types):
    train, train_types, test, labels, test_types = two_types
    variant = ClassAwareB(**COMMON, base=FakeBase(**COMMON), iterations=100, calibration_fraction=0.0)
    variant.fit(train, train_types)
    assert variant.predict_categories(test) == test_types  # separable types: every test image right
    a = ClassAwareA(**COMMON, base=variant.base_, calibration_fraction=0.0).fit(train, train_types)
    torch.testing.assert_close(variant.score(test).image_scores, a.score(test, test_types).image_scores)
    with pytest.raises(ValueError, match="predicts the type"):
        variant.score(test, test_types)


@pytest.mark.parametrize("geometry", [{"tile_size": 32}, {"image_size": (64, 96)}])
@pytest.mark.parametrize("variant", [ClassAwareA, ClassAwareB])
def test_class_aware_variants_refuse_tiling_and_pair_sizes_by_name(variant, geometry):
    with pytest.raises(ValueError, match="scores whole square images only"):
        variant(base="padim", **geometry).fit(torch.rand(4, 3, 64, 64), ["a", "a", "b", "b"])
    assert CADA(base="padim", **geometry).resolved_params()  # CADA itself takes both
