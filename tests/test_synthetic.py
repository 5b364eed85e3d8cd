"""The synthetic multi-type set: deterministic, exact masks, distinct types, MVTec layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omniad.data import SYNTHETIC_CATEGORIES, MVTecDataset, make_synthetic_dataset
from omniad.data.synthetic import DEFECT_TYPES, render_sample

TINY = {"n_train": 3, "n_test_good": 1, "n_test_defect": 4, "image_size": 32}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_different_seed_different(tmp_path):
    a = _files(make_synthetic_dataset(tmp_path / "a", seed=3, **TINY))
    b = _files(make_synthetic_dataset(tmp_path / "b", seed=3, **TINY))
    c = _files(make_synthetic_dataset(tmp_path / "c", seed=4, **TINY))
    assert a == b
    assert a.keys() == c.keys()
    images = [k for k in a if k.endswith(".png")]
    assert all(a[k] != c[k] for k in images if "/train/" in k)


def test_subset_does_not_change_other_types(tmp_path):
    full = _files(make_synthetic_dataset(tmp_path / "full", **TINY))
    part = _files(make_synthetic_dataset(tmp_path / "part", categories=["washer"], **TINY))
    assert {k: v for k, v in full.items() if k.startswith("washer/")} == {
        k: v for k, v in part.items() if k.startswith("washer/")
    }


def test_layout_and_defect_types(synthetic_root, synthetic_params):
    for category in synthetic_params["categories"]:
        folder = synthetic_root / category
        assert len(list((folder / "train" / "good").glob("*.png"))) == synthetic_params["n_train"]
        assert len(list((folder / "test" / "good").glob("*.png"))) == synthetic_params["n_test_good"]
        types = sorted(p.name for p in (folder / "test").iterdir() if p.name != "good")
        assert types == sorted(DEFECT_TYPES)
        for kind in types:
            stems = sorted(p.stem for p in (folder / "test" / kind).glob("*.png"))
            masks = sorted(p.stem for p in (folder / "ground_truth" / kind).glob("*.png"))
            assert masks == [f"{s}_mask" for s in stems]
    params = json.loads((synthetic_root / "synthetic.json").read_text())
    assert params["seed"] == synthetic_params["seed"]


def test_written_files_are_the_renders_and_masks_are_exact(synthetic_root, synthetic_params):
    size, seed = synthetic_params["image_size"], synthetic_params["seed"]
    for category in synthetic_params["categories"]:
        numbers: dict[str, int] = {}
        for index in range(synthetic_params["n_test_defect"]):
            normal, image, mask, kind = render_sample(category, "defect", index, size, seed)
            number = numbers[kind] = numbers.get(kind, -1) + 1
            on_disk = np.asarray(Image.open(synthetic_root / category / "test" / kind / f"{number:03d}.png"))
            mask_on_disk = np.asarray(
                Image.open(synthetic_root / category / "ground_truth" / kind / f"{number:03d}_mask.png")
            )
            assert np.array_equal(on_disk, image)
            assert set(np.unique(mask_on_disk)) <= {0, 255}
            changed = (image != normal).any(axis=2)
            # Exact: every changed pixel is in the mask, every mask pixel is changed.
            assert np.array_equal(changed, mask_on_disk > 0), (category, kind)
            assert 0 < mask.mean() < 0.1, (category, kind, mask.mean())
        train0 = np.asarray(Image.open(synthetic_root / category / "train" / "good" / "000.png"))
        assert np.array_equal(train0, render_sample(category, "train", 0, size, seed)[1])


def test_object_defects_lie_on_the_part():
    """A hole in a washer is on the metal ring, not in the background or the washer's centre."""
    for index in range(2, 40, 4):  # index % 4 == 2: "hole"
        normal, _, mask, kind = render_sample("washer", "defect", index, 96, seed=1)
        assert kind == "hole"
        brightness = normal.mean(axis=2)
        assert brightness[mask].mean() > 75  # metal is 85-170 grey levels, the background and centre ~50


def test_types_differ_in_look_and_noise():
    size = 64
    means, roughness = {}, {}
    for category in SYNTHETIC_CATEGORIES:
        images = np.stack([render_sample(category, "train", i, size)[1] for i in range(4)]).astype(float)
        means[category] = images.mean(axis=(0, 1, 2))
        roughness[category] = np.abs(np.diff(images, axis=2)).mean()  # horizontal neighbour differences
    names = list(SYNTHETIC_CATEGORIES)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            colour_gap = np.abs(means[a] - means[b]).max()
            assert colour_gap > 15 or abs(roughness[a] - roughness[b]) > 2, (a, b)
    assert roughness["granite"] > 1.5 * roughness["washer"]


def test_normal_images_vary():
    for category in SYNTHETIC_CATEGORIES:
        first, second = (render_sample(category, "train", i, 64)[1].astype(int) for i in range(2))
        assert np.abs(first - second).mean() > 2, category


def test_reader_round_trip(synthetic_root, synthetic_params):
    size = synthetic_params["image_size"]
    test = MVTecDataset(synthetic_root, categories="granite", split="test", image_size=size)
    for sample in test:
        if sample.label:
            mask_file = Path(sample.path).parents[2] / "ground_truth" / sample.defect_type
            expected = np.asarray(Image.open(mask_file / f"{Path(sample.path).stem}_mask.png")) > 0
            assert np.array_equal(sample.mask.numpy() > 0, expected)


def test_existing_set_reused_or_refused(tmp_path):
    root = make_synthetic_dataset(tmp_path, categories=["weave"], **TINY)
    marker = root / "weave" / "train" / "good" / "000.png"
    stamp = marker.stat().st_mtime_ns
    assert make_synthetic_dataset(tmp_path, categories=["weave"], **TINY) == root
    assert marker.stat().st_mtime_ns == stamp  # same parameters: nothing rewritten
    with pytest.raises(FileExistsError, match="overwrite=True"):
        make_synthetic_dataset(tmp_path, categories=["weave"], seed=9, **TINY)
    make_synthetic_dataset(tmp_path, categories=["weave"], seed=9, overwrite=True, **TINY)
    assert json.loads((root / "synthetic.json").read_text())["seed"] == 9


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="carpet"):
        make_synthetic_dataset(tmp_path, categories=["carpet"])
    with pytest.raises(ValueError, match="n_train"):
        make_synthetic_dataset(tmp_path, n_train=0)
    with pytest.raises(ValueError, match="kind"):
        render_sample("weave", "test", 0)
