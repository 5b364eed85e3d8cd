"""Model bundles: exact save -> load, no pickle, atomic overwrite, and clear errors for every broken bundle."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import omniad.io as io
from omniad import create_detector, load_detector
from omniad.io import BundleError

SIZE = 32
COMMON = dict(weights="random", image_size=SIZE, device="cpu", progress=False, batch_size=8, calibration_fraction=0.34)
TINY = {
    "patchcore": dict(stages=(1, 2), coreset_ratio=0.2, projection_dim=16),
    "padim": dict(stages=(1, 2), n_features=12),
}


@pytest.fixture(scope="module")
def images():
    return torch.rand(6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def fitted(images):
    return {name: create_detector(name, **COMMON, **kw).fit(images) for name, kw in TINY.items()}


@pytest.fixture()
def bundle(fitted, tmp_path):
    path = tmp_path / "model"
    fitted["patchcore"].save(path)
    return path


@pytest.mark.parametrize("name", list(TINY))
def test_save_load_gives_identical_scores_and_threshold(name, fitted, images, tmp_path):
    det = fitted[name]
    det.save(tmp_path / name)
    loaded = load_detector(tmp_path / name)
    assert type(loaded) is type(det)
    assert loaded.get_params() == det.get_params()
    assert loaded.threshold_ == det.threshold_ and not torch.isnan(torch.tensor(det.threshold_))
    a, b = det.score(images), loaded.score(images)
    assert torch.equal(a.image_scores, b.image_scores)
    assert torch.equal(a.anomaly_maps, b.anomaly_maps)
    torch.testing.assert_close(loaded.predict(images), det.predict(images))


def test_no_calibration_survives_json(fitted, images, tmp_path):
    det = create_detector("padim", **{**COMMON, "calibration_fraction": 0.0}, **TINY["padim"]).fit(images)
    det.save(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["meta"]["calibration"] is None
    loaded = load_detector(tmp_path / "m")
    assert loaded.calibration_ is None and torch.isnan(torch.tensor(loaded.threshold_))


def test_the_calibration_travels_with_the_model_and_recalibrates_honestly(fitted, images, tmp_path):
    det = fitted["padim"]
    det.save(tmp_path / "m")
    loaded = load_detector(tmp_path / "m")
    assert loaded.calibration_.source == det.calibration_.source and "held out" in loaded.calibration_.source
    assert loaded.calibration_.normal_scores.tolist() == det.calibration_.normal_scores.tolist()
    # another false-alarm rate from the saved held-out scores: the same as recalibrating the fitted model
    assert loaded.calibration_.at(0.5).threshold == det.calibration_.at(0.5).threshold


def test_bundle_is_json_and_safetensors_without_pickle(bundle, fitted):
    assert sorted(os.listdir(bundle)) == ["config.json", "weights.safetensors"]
    config = json.loads((bundle / "config.json").read_text())
    assert config["format"] == io.FORMAT and config["format_version"] == io.FORMAT_VERSION
    assert config["method"] == "patchcore" and config["params"]["stages"] == [1, 2]
    tensors = load_file(str(bundle / "weights.safetensors"))
    assert set(tensors) == set(fitted["patchcore"].state_tensors())
    assert any(k.endswith("memory_bank") for k in tensors)
    for path in bundle.iterdir():
        assert b"\x80\x04\x95" not in path.read_bytes()[:64]  # no pickle protocol-4 header


def test_load_overrides_device(bundle):
    assert load_detector(bundle, device="cpu").device_ == torch.device("cpu")


def _no_staging_left(folder) -> bool:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("where", ["weights", "config", "swap"])
def test_crash_mid_save_keeps_the_old_bundle(where, bundle, fitted, images, monkeypatch):
    before = fitted["patchcore"].score(images)
    old_config = (bundle / "config.json").read_text()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    if where == "weights":
        monkeypatch.setattr(io, "save_file", boom)
    elif where == "config":
        monkeypatch.setattr(io.json, "dump", boom)
    else:  # the last rename, after the old bundle was moved aside
        real_replace = os.replace

        def replace(src, dst):
            if ".saving-" in str(src):
                raise OSError("crash between the renames")
            return real_replace(src, dst)

        monkeypatch.setattr(io.os, "replace", replace)
    with pytest.raises(OSError):
        fitted["padim"].save(bundle)
    monkeypatch.undo()
    assert (bundle / "config.json").read_text() == old_config
    assert _no_staging_left(bundle.parent), list(bundle.parent.iterdir())
    after = load_detector(bundle).score(images)
    assert torch.equal(after.image_scores, before.image_scores)


def test_overwrite_with_a_new_fit(bundle, fitted, images):
    fitted["padim"].save(bundle)
    loaded = load_detector(bundle)
    assert loaded.name == "padim"
    assert torch.equal(loaded.score(images).image_scores, fitted["padim"].score(images).image_scores)
    assert _no_staging_left(bundle.parent)


def test_refuses_to_overwrite_a_foreign_folder(fitted, tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"not a model")
    with pytest.raises(BundleError, match="not an omniad model folder"):
        fitted["patchcore"].save(foreign)
    assert os.listdir(foreign) == ["holiday.jpg"]
    assert _no_staging_left(tmp_path)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(BundleError, match="file.txt"):
        fitted["patchcore"].save(a_file)
    assert a_file.read_text() == "x"
    # an empty folder is fine
    (tmp_path / "empty").mkdir()
    fitted["patchcore"].save(tmp_path / "empty")
    assert load_detector(tmp_path / "empty").name == "patchcore"


def _edit_config(bundle, **changes):
    config = json.loads((bundle / "config.json").read_text())
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key].update(value)
        elif value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (bundle / "config.json").write_text(json.dumps(config))


BREAKAGES = {
    "missing folder": (lambda b: shutil.rmtree(b), "does not exist"),
    "no config": (lambda b: (b / "config.json").unlink(), "config.json is missing"),
    "corrupt config": (lambda b: (b / "config.json").write_text('{"format": "omniad-det'), "corrupt"),
    "config not an object": (lambda b: (b / "config.json").write_text("[1, 2]"), "not an omniad model config"),
    "foreign json": (lambda b: (b / "config.json").write_text('{"format": "keras", "layers": []}'), "'keras'"),
    "wrong version": (lambda b: _edit_config(b, format_version=99), "format 99"),
    "no weights": (lambda b: (b / "weights.safetensors").unlink(), "weights.safetensors is missing"),
    "corrupt weights": (lambda b: (b / "weights.safetensors").write_bytes(b"\x10\x00garbage"), "corrupt"),
    "truncated weights": (
        lambda b: (b / "weights.safetensors").write_bytes((b / "weights.safetensors").read_bytes()[:200]),
        "corrupt",
    ),
    "weights do not match meta": (lambda b: _edit_config(b, meta={"bank_size": 3}), "do not match"),
    "missing tensor": (
        lambda b: save_file(
            {k: v for k, v in load_file(str(b / "weights.safetensors")).items() if "memory_bank" not in k},
            str(b / "weights.safetensors"),
        ),
        "do not match",
    ),
    "unknown method": (lambda b: _edit_config(b, method="nosuchmethod"), "unknown detector 'nosuchmethod'"),
    "unknown parameter": (lambda b: _edit_config(b, params={"not_a_param": 1}), "not_a_param"),
    "no params": (lambda b: _edit_config(b, params=None), "parameters"),
    "non-numeric threshold": (
        lambda b: _edit_config(b, meta={"calibration": {**_config(b)["meta"]["calibration"], "threshold": "x"}}),
        "threshold must be a finite number",
    ),
    "threshold edited": (
        lambda b: _edit_config(b, meta={"calibration": {**_config(b)["meta"]["calibration"], "threshold": -5.0}}),
        "does not follow from its normal scores",
    ),
    "index out of range": (
        lambda b: _edit_tensor(b, "net.channel_index", lambda t: t + 10_000, model="padim"),
        "cannot score an image",
    ),
    "NaN weights": (
        lambda b: _edit_tensor(b, "net.mean", lambda t: t * float("nan"), model="padim"), "NaN or infinite",
    ),
    "out-of-range parameter": (lambda b: _edit_config(b, params={"coreset_ratio": 2}), "coreset_ratio must be in"),
    "out-of-range meta": (lambda b: _edit_config(b, meta={"bank_size": -3}), "do not match"),
    "meta not a mapping": (lambda b: _edit_config(b, meta=[1]), "'meta' must be a mapping"),
}


def _edit_tensor(bundle, key, change, model):
    assert _config(bundle)["method"] == model, "the case needs that model's bundle"
    tensors = load_file(str(bundle / "weights.safetensors"))
    tensors[key] = change(tensors[key])
    save_file(tensors, str(bundle / "weights.safetensors"))


def _config(bundle):
    return json.loads((bundle / "config.json").read_text())


@pytest.mark.parametrize("case", list(BREAKAGES))
def test_broken_bundles_raise_bundle_error_naming_the_path(case, bundle, fitted):
    breaker, match = BREAKAGES[case]
    if "padim" in case or case in ("index out of range", "NaN weights"):
        fitted["padim"].save(bundle)
    breaker(bundle)
    with pytest.raises(BundleError, match=match) as info:
        load_detector(bundle)
    assert str(bundle) in str(info.value)


def test_device_without_cuda_says_so(bundle):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(BundleError, match="no CUDA device"):
        load_detector(bundle, device="cuda")
