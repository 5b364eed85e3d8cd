"""The bad-input corpus at the readers: every unusable file is an error naming it or a reported skip, never a
silent drop."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omniad.data import ImageReadError, MVTecDataset, read_image


def _png(path: Path, size: int = 32, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)
    return path


@pytest.mark.parametrize("limit", [1000, 3000])  # 4096 pixels: over twice the limit (PIL error), over it (warning)
def test_read_image_refuses_a_decompression_bomb_naming_the_file(tmp_path, monkeypatch, limit):
    big = _png(tmp_path / "big.png", size=64)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(ImageReadError, match=r"big\.png: image too large.*MAX_IMAGE_PIXELS"):
        read_image(big)


def test_read_image_under_the_pixel_limit_reads(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    assert read_image(_png(tmp_path / "ok.png", size=64)).shape == (3, 64, 64)


def test_read_image_names_a_broken_symlink(tmp_path):
    link = tmp_path / "gone.png"
    os.symlink(tmp_path / "nowhere.png", link)
    with pytest.raises(ImageReadError, match=r"gone\.png: broken symbolic link .*nowhere\.png"):
        read_image(link)


def _layout(root: Path) -> Path:
    """A one-category MVTec layout with two good training images and one defective test image (no masks)."""
    good = root / "cat" / "train" / "good"
    _png(good / "000.png")
    _png(good / "001.png", value=100)
    _png(root / "cat" / "test" / "good" / "000.png")
    _png(root / "cat" / "test" / "crack" / "000.png", value=10)
    return good


def test_mvtec_reports_every_entry_it_does_not_use(tmp_path):
    good = _layout(tmp_path)
    _png(good / "nested" / "002.png")  # a sub-folder: not searched, but its images must not vanish silently
    os.symlink(tmp_path / "missing.png", good / "003.png")
    (good / "notes.txt").write_text("taken on line 3")
    (tmp_path / "cat" / "test" / "crack" / "readme.md").write_text("x")

    train = MVTecDataset(tmp_path, split="train", image_size=32)
    assert [r.path.name for r in train.samples] == ["000.png", "001.png"]
    reasons = {s.path.name: s.reason for s in train.skipped}
    assert set(reasons) == {"nested", "003.png", "notes.txt"}
    assert "sub-folder" in reasons["nested"]
    assert "broken symbolic link" in reasons["003.png"] and "missing.png" in reasons["003.png"]
    assert "not an image file name" in reasons["notes.txt"]

    test = MVTecDataset(tmp_path, split="test", image_size=32)
    assert [s.path.name for s in test.skipped] == ["readme.md"] and len(test) == 2


def test_mvtec_clean_folders_skip_nothing(tmp_path):
    _layout(tmp_path)
    assert MVTecDataset(tmp_path, split="train", image_size=32).skipped == []


def test_mvtec_training_folder_of_only_unusable_entries_says_what_it_holds(tmp_path):
    good = tmp_path / "cat" / "train" / "good"
    _png(good / "sub" / "000.png")
    (good / "list.csv").write_text("a,b")
    with pytest.raises(ValueError, match=r"no images .* it holds only list\.csv .*sub \(sub-folder"):
        MVTecDataset(tmp_path, split="train", image_size=32)


def test_mvtec_unreadable_image_is_an_error_naming_it_at_read_time(tmp_path):
    good = _layout(tmp_path)
    (good / "002.png").write_text("not a png at all")
    train = MVTecDataset(tmp_path, split="train", image_size=32)
    assert len(train) == 3 and train.skipped == []  # looks like an image by name: read, and refused there
    with pytest.raises(ImageReadError, match=r"002\.png: not an image"):
        train[2]
