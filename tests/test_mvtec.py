"""MVTecDataset: layouts (MVTec, BTAD, VisA), category selection, several roots, errors naming their path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from omniad.data import ImageReadError, MVTecDataset, list_categories
from omniad.data.sources import iterate_samples


def _image(path: Path, size=(20, 16), value=100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[0], size[1], 3), value, dtype=np.uint8)).save(path)
    return path


def _mask(path: Path, size=(20, 16), box=(slice(4, 12), slice(2, 10))) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros(size, dtype=np.uint8)
    mask[box] = 255
    Image.fromarray(mask).save(path)
    return path


def _category(
    root: Path,
    name: str,
    n_train=3,
    n_good=2,
    defects=("crack",),
    masks=True,
    normal="good",
    ext=".png",
    mask_name="{stem}_mask.png",
) -> Path:
    folder = root / name
    for i in range(n_train):
        _image(folder / "train" / normal / f"{i:03d}{ext}")
    for i in range(n_good):
        _image(folder / "test" / normal / f"{i:03d}{ext}")
    for kind in defects:
        for i in range(2):
            _image(folder / "test" / kind / f"{i:03d}{ext}", value=200)
            if masks:
                _mask(folder / "ground_truth" / kind / mask_name.format(stem=f"{i:03d}"))
    return folder


def test_reads_synthetic_set(synthetic_root, synthetic_params):
    train = MVTecDataset(synthetic_root, split="train", image_size=32)
    # At the files' own size: downscaling would erase 1-px scratches under the > 0.5 rule.
    test = MVTecDataset(synthetic_root, split="test", image_size=synthetic_params["image_size"])
    names = sorted(synthetic_params["categories"])
    assert train.categories == names == test.categories == list_categories(synthetic_root)
    assert len(train) == len(names) * synthetic_params["n_train"]
    per_category = synthetic_params["n_test_good"] + synthetic_params["n_test_defect"]
    assert len(test) == len(names) * per_category
    assert all(train.has_masks.values()) and all(test.has_masks.values())
    assert set(train.labels) == {0} and test.labels.count(1) == len(names) * synthetic_params["n_test_defect"]
    for index in range(len(test)):
        sample = test[index]
        size = synthetic_params["image_size"]
        assert sample.image.shape == (3, size, size) and sample.mask.shape == (size, size)
        assert set(sample.mask.unique().tolist()) <= {0.0, 1.0}
        assert (sample.mask.sum() > 0) == (sample.label == 1) == (sample.defect_type != "good")
        assert sample.has_mask and sample.category in names and Path(sample.path).is_file()


def test_order_is_normal_first_then_types(synthetic_root):
    test = MVTecDataset(synthetic_root, categories="weave", split="test", image_size=None)
    kinds = [r.defect_type for r in test.samples]
    assert kinds[0] == "good" and kinds[-1] != "good"
    assert kinds == sorted(kinds, key=lambda k: (k != "good", k))
    assert test[0].image.shape[-1] == 64  # image_size=None keeps the file's size


def test_category_subset_and_unknown(synthetic_root):
    one = MVTecDataset(synthetic_root, categories="washer")
    assert one.categories == ["washer"] and {r.category for r in one.samples} == {"washer"}
    two = MVTecDataset(synthetic_root, categories=["washer", "weave"])
    assert two.categories == ["washer", "weave"]
    with pytest.raises(ValueError, match="available.*granite"):
        MVTecDataset(synthetic_root, categories=["washer", "carpet"])


def test_multiple_roots_and_duplicates(tmp_path):
    _category(tmp_path / "a", "bottle")
    _category(tmp_path / "b", "cable")
    _category(tmp_path / "c", "bottle")
    both = MVTecDataset([tmp_path / "a", str(tmp_path / "b")], split="test", image_size=8)
    assert both.categories == ["bottle", "cable"]
    assert {r.category for r in both.samples} == {"bottle", "cable"}
    with pytest.raises(ValueError, match="two roots") as info:
        MVTecDataset([tmp_path / "a", tmp_path / "c"])
    assert str(tmp_path / "a" / "bottle") in str(info.value) and str(tmp_path / "c" / "bottle") in str(
        info.value
    )


def test_image_level_only_category(tmp_path):
    _category(tmp_path, "plain", masks=False)
    _category(tmp_path, "pixel")
    test = MVTecDataset(tmp_path, split="test", image_size=8)
    assert test.has_masks == {"pixel": True, "plain": False}
    for sample in test:
        if sample.category == "plain":
            assert not sample.has_mask and sample.mask.sum() == 0
        else:
            assert sample.has_mask and (sample.mask.sum() > 0) == (sample.label == 1)


def test_btad_layout(tmp_path):
    """BTAD: train/ok, test/ok, test/ko, bmp images, masks named like their image."""
    _category(tmp_path, "01", normal="ok", defects=("ko",), ext=".bmp", mask_name="{stem}.png")
    _category(tmp_path, "03", normal="ok", defects=("ko",), ext=".bmp", mask_name="{stem}.bmp")
    train = MVTecDataset(tmp_path, split="train", image_size=8)
    test = MVTecDataset(tmp_path, split="test", image_size=8)
    assert len(train) == 6 and {r.defect_type for r in train.samples} == {"good"}
    assert [r.defect_type for r in test.samples] == ["good", "good", "ko", "ko"] * 2
    assert all(r.mask_path is not None for r in test.samples if r.label == 1)
    assert test[3].mask.sum() > 0


def test_visa_1cls_layout(tmp_path):
    """VisA after its 1cls split: test/bad/000.JPG with ground_truth/bad/000.png."""
    _category(tmp_path, "candle", defects=("bad",), ext=".JPG", mask_name="{stem}.png")
    test = MVTecDataset(tmp_path, split="test", image_size=8)
    assert test.counts() == {"candle": {"good": 2, "bad": 2}}
    assert test.samples[-1].mask_path.name == "001.png"


def test_stray_files_ignored(tmp_path):
    folder = _category(tmp_path, "bottle")
    (folder / "train" / "good" / "Thumbs.db").write_bytes(b"x")
    (folder / "train" / "good" / "notes.txt").write_text("x")
    (tmp_path / "license.txt").write_text("x")
    (tmp_path / "not_a_category").mkdir()
    assert list_categories(tmp_path) == ["bottle"]
    assert len(MVTecDataset(tmp_path)) == 3


def test_missing_root_and_empty_root(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        MVTecDataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no categories") as info:
        MVTecDataset(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(info.value)


def test_missing_or_empty_train_good(tmp_path):
    _category(tmp_path / "r1", "bottle", n_train=0)
    (tmp_path / "r1" / "bottle" / "train" / "good").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images") as info:
        MVTecDataset(tmp_path / "r1")
    assert str(tmp_path / "r1" / "bottle" / "train" / "good") in str(info.value)

    _category(tmp_path / "r2", "cable", n_train=0)
    with pytest.raises(FileNotFoundError, match="train") as info:
        MVTecDataset(tmp_path / "r2")
    assert str(tmp_path / "r2" / "cable") in str(info.value)
    # The test split does not need training images.
    assert len(MVTecDataset(tmp_path / "r2", split="test")) == 4


def test_missing_masks_listed_at_construction(tmp_path):
    folder = _category(tmp_path, "bottle", defects=("crack", "hole"))
    (folder / "ground_truth" / "crack" / "001_mask.png").unlink()
    for mask in (folder / "ground_truth" / "hole").iterdir():
        mask.unlink()
    with pytest.raises(FileNotFoundError, match="3 defective") as info:
        MVTecDataset(tmp_path, split="test")
    message = str(info.value)
    assert str(folder / "test" / "crack" / "001.png") in message
    assert str(folder / "test" / "hole" / "000.png") in message
    assert str(folder / "test" / "crack" / "000.png") not in message
    assert len(MVTecDataset(tmp_path, split="train")) == 3  # the train split never looks at masks


def test_unreadable_image_raises_at_read_time(tmp_path):
    folder = _category(tmp_path, "bottle")
    broken = folder / "test" / "crack" / "001.png"
    broken.write_bytes(broken.read_bytes()[:-30])
    test = MVTecDataset(tmp_path, split="test", image_size=8)  # construction only lists files
    with pytest.raises(ImageReadError, match="truncated") as info:
        test[len(test) - 1]
    assert str(broken) in str(info.value)


def test_mask_size_mismatch(tmp_path):
    folder = _category(tmp_path, "bottle")
    _mask(folder / "ground_truth" / "crack" / "000_mask.png", size=(10, 10), box=(slice(0, 4), slice(0, 4)))
    test = MVTecDataset(tmp_path, split="test", image_size=8)
    with pytest.raises(ValueError, match="000_mask.png"):
        test[2]


def test_bad_arguments(tmp_path):
    _category(tmp_path, "bottle")
    with pytest.raises(ValueError, match="split"):
        MVTecDataset(tmp_path, split="val")
    with pytest.raises(ValueError, match="image_size"):
        MVTecDataset(tmp_path, image_size=0)


def test_non_square_size_and_batching(tmp_path):
    _category(tmp_path, "bottle")
    test = MVTecDataset(tmp_path, split="test", image_size=(12, 8))
    batches = list(iterate_samples(test, batch_size=3))
    assert [len(b) for b in batches] == [3, 1]
    assert batches[0].images.shape == (3, 3, 12, 8) and batches[0].masks.shape == (3, 12, 8)
    assert batches[1].labels.tolist() == [1] and batches[1].categories == ["bottle"]
    assert torch.equal(batches[0].masks[0], torch.zeros(12, 8))


@pytest.mark.realdata
def test_industrial_counts_match_readme(industrial_root):
    train = MVTecDataset(industrial_root, split="train")
    test = MVTecDataset(industrial_root, split="test")
    assert train.categories == ["kolektor", "magnetic_tile"] and all(test.has_masks.values())
    assert train.counts() == {"kolektor": {"good": 233}, "magnetic_tile": {"good": 762}}
    counts = test.counts()
    assert counts["kolektor"] == {"good": 100, "defect": 50}
    assert counts["magnetic_tile"] == {
        "good": 190,
        "blowhole": 115,
        "break": 85,
        "crack": 57,
        "fray": 32,
        "uneven": 103,
    }


@pytest.mark.realdata
def test_industrial_grayscale_becomes_three_channels(industrial_root):
    test = MVTecDataset(industrial_root, split="test", image_size=256)  # thin cracks vanish at 64 px
    for category in test.categories:
        index = next(i for i, r in enumerate(test.samples) if r.category == category and r.label == 1)
        sample = test[index]
        assert sample.image.shape == (3, 256, 256)
        assert torch.equal(sample.image[0], sample.image[1]) and torch.equal(sample.image[1], sample.image[2])
        assert set(sample.mask.unique().tolist()) <= {0.0, 1.0}
    kolektor = next(i for i, r in enumerate(test.samples) if r.category == "kolektor" and r.label == 1)
    assert test[kolektor].mask.sum() > 0
