"""Readers of class-labelled sets: class folders, MNIST IDX, COCO instances, on tiny files written here."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from omniad.data import ImageReadError
from omniad.data.labelled import FASHION_MNIST_CLASSES, read_class_folders, read_coco, read_idx, split_per_class

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_idx(root: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool = True,
              image_magic: int = 0x803, cut: int = 0) -> None:
    """MNIST IDX files: big-endian magic and dimensions, then unsigned bytes; ``cut`` bytes dropped at the end."""
    root.mkdir(parents=True, exist_ok=True)
    header = image_magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in images.shape)
    blobs = {
        f"{prefix}-images-idx3-ubyte": header + images.astype(np.uint8).tobytes(),
        f"{prefix}-labels-idx1-ubyte": (0x801).to_bytes(4, "big") + len(labels).to_bytes(4, "big")
        + labels.astype(np.uint8).tobytes(),
    }
    for name, blob in blobs.items():
        blob = blob[: len(blob) - cut] if cut and "images" in name else blob
        if gz:
            (root / f"{name}.gz").write_bytes(gzip.compress(blob))
        else:
            (root / name).write_bytes(blob)


def tiny_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 6, 5), dtype=np.uint8)


def test_idx_reads_images_and_labels(tmp_path):
    images, labels = tiny_images(7), np.array([0, 1, 2, 1, 0, 2, 1])
    write_idx(tmp_path, "train", images, labels)
    write_idx(tmp_path, "t10k", tiny_images(3, 1), np.array([2, 0, 1]), gz=False)
    data = read_idx(tmp_path, "train", image_size=None)
    assert len(data) == 7 and data.class_names == ["0", "1", "2"]
    assert data.labels[3] == frozenset({"1"})
    image = data[4]
    assert image.shape == (3, 6, 5) and image.dtype == torch.float32
    assert torch.equal(image[0], torch.from_numpy(images[4]).float() / 255) and torch.equal(image[0], image[2])
    assert read_idx(tmp_path, "train", image_size=16)[0].shape == (3, 16, 16)
    test = read_idx(tmp_path, "test", image_size=None, class_names=FASHION_MNIST_CLASSES)  # the t10k files, no .gz
    assert len(test) == 3 and test.labels[0] == frozenset({"pullover"})


def test_idx_truncated_file_is_a_clear_error(tmp_path):
    write_idx(tmp_path, "train", tiny_images(4), np.array([0, 1, 0, 1]), cut=7)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz: truncated IDX file: 129 bytes.*needs 136"):
        read_idx(tmp_path, "train")


def test_idx_bad_magic_is_a_clear_error(tmp_path):
    write_idx(tmp_path, "train", tiny_images(4), np.array([0, 1, 0, 1]), image_magic=0x801)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz: bad IDX magic number 0x00000801"):
        read_idx(tmp_path, "train")


def test_idx_image_and_label_counts_must_agree(tmp_path):
    write_idx(tmp_path, "train", tiny_images(4), np.array([0, 1, 0]))
    with pytest.raises(ValueError, match=r"holds 4 images but .*labels-idx1-ubyte.gz holds 3 labels"):
        read_idx(tmp_path, "train")


def test_idx_missing_file_names_it(tmp_path):
    write_idx(tmp_path, "train", tiny_images(2), np.array([0, 1]))
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        read_idx(tmp_path, "test")


def test_class_folders_grey_and_colour_and_reported_entries(tmp_path):
    for cls, mode in (("cat", "L"), ("dog", "RGB")):
        folder = tmp_path / "train" / cls
        folder.mkdir(parents=True)
        for k in range(2):
            Image.new(mode, (5, 4), 40 * (k + 1)).save(folder / f"{k}.png")
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    data = read_class_folders(tmp_path, "train", image_size=None)
    assert data.class_names == ["cat", "dog"] and len(data) == 4
    assert data.labels == [frozenset({"cat"})] * 2 + [frozenset({"dog"})] * 2
    grey = data[1]
    assert grey.shape == (3, 4, 5) and torch.allclose(grey, torch.full_like(grey, 80 / 255))
    assert [(s.path.name, "not an image" in s.reason) for s in data.skipped] == [("notes.txt", True)]

    (tmp_path / "train" / "cat" / "2.png").write_bytes(b"\x89PNG broken")
    broken = read_class_folders(tmp_path, "train", image_size=None)
    with pytest.raises(ImageReadError, match="2.png"):
        broken[2]


def test_class_folders_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no test folder"):
        read_class_folders(tmp_path, "test")
    (tmp_path / "train" / "empty").mkdir(parents=True)
    with pytest.raises(ValueError, match="empty holds no images"):
        read_class_folders(tmp_path, "train")


def test_a_seeded_split_per_class_puts_every_image_in_one_split(tmp_path):
    for c, cls in enumerate(("cat", "dog", "eel")):
        folder = tmp_path / "train" / cls
        folder.mkdir(parents=True)
        for k in range(5):
            Image.new("L", (3, 3), 10 * c + k).save(folder / f"{k}.png")
    data = read_class_folders(tmp_path, "train", image_size=None)
    train, test = split_per_class(data, test_per_class=2, seed=3)
    assert len(train) == 9 and len(test) == 6
    assert sorted(train.paths + test.paths) == sorted(data.paths)
    assert test.counts() == {"cat": 2, "dog": 2, "eel": 2} and train.class_names == data.class_names
    for split in (train, test):  # an image read through a split is its file's image
        torch.testing.assert_close(split[1], data[data.paths.index(split.paths[1])])
    assert split_per_class(data, 2, seed=3)[1].paths == test.paths
    assert split_per_class(data, 2, seed=4)[1].paths != test.paths
    with pytest.raises(ValueError, match="too few"):
        split_per_class(data, 5)
    with pytest.raises(ValueError, match="test_per_class"):
        split_per_class(data, 0)


def write_coco(root: Path, annotations: list[dict], files: tuple[str, ...] = ("a.jpg", "b.jpg", "c.jpg")) -> None:
    (root / "annotations").mkdir(parents=True)
    (root / "images").mkdir()
    for name in files:
        Image.new("RGB", (8, 6), (200, 10, 10)).save(root / "images" / name)
    content = {
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}, {"id": 3, "file_name": "c.jpg"}],
        "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}],
        "annotations": annotations,
    }
    (root / "annotations" / "instances.json").write_text(json.dumps(content))


def test_coco_label_sets(tmp_path):
    write_coco(tmp_path, [{"image_id": 1, "category_id": 1}, {"image_id": 1, "category_id": 3},
                          {"image_id": 1, "category_id": 1}, {"image_id": 2, "category_id": 3}])
    data = read_coco(tmp_path, image_size=None)
    assert data.class_names == ["person", "car"]
    assert data.labels == [frozenset({"person", "car"}), frozenset({"car"}), frozenset()]
    assert data[0].shape == (3, 6, 8)


def test_coco_image_entry_naming_a_missing_file(tmp_path):
    write_coco(tmp_path, [{"image_id": 1, "category_id": 1}], files=("a.jpg", "c.jpg"))
    with pytest.raises(FileNotFoundError, match=r"instances.json: 1 image entries name files that do not exist.*b.jpg"):
        read_coco(tmp_path)


def test_coco_annotation_naming_a_missing_image(tmp_path):
    write_coco(tmp_path, [{"image_id": 9, "category_id": 1}])
    with pytest.raises(ValueError, match="instances.json: an annotation names image id 9"):
        read_coco(tmp_path)


def test_real_semantic_and_multi_object_data():
    fashion, coco = SHARED / "semantic" / "fashion-mnist", SHARED / "multi-object" / "coco128"
    if not fashion.is_dir() or not coco.is_dir():
        pytest.skip(f"real data not found under {SHARED}")
    train, test = read_idx(fashion, "train", image_size=None), read_idx(fashion, "test", image_size=None)
    assert len(train) == 60000 and len(test) == 10000
    assert set(train.counts().values()) == {6000} and set(test.counts().values()) == {1000}
    assert train[0].shape == (3, 28, 28)
    objects = read_coco(coco, image_size=None)
    assert len(objects) == 128 and len(objects.class_names) == 80
    assert sum("person" in labels for labels in objects.labels) == 61  # as the data's README says


def test_a_protocol_run_reports_the_class_folder_entries_it_did_not_use(tmp_path, capsys):
    from omniad.cli import main

    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for k in range(6):
                Image.new("RGB", (32, 32), (30 * k, 20 * (cls == "dog"), 90)).save(folder / f"{k}.png")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    assert main(["run", "--method", "padim", "--weights", "random", "--image-size", "32", "--no-progress",
                 "--data-format", "folders", "--data", str(tmp_path), "--protocol", "uni-class",
                 "--normal-classes", "cat", "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "1 entries of the train folders are not used" in err and "notes.txt" in err


def test_a_protocol_on_class_folders_without_a_test_split_holds_out_images_per_class(tmp_path, capsys):
    from omniad.cli import main
    from omniad.data.novelty import load_protocol

    for cls in ("cat", "dog", "eel"):
        folder = tmp_path / "train" / cls
        folder.mkdir(parents=True)
        for k in range(6):
            Image.new("RGB", (32, 32), (30 * k, 40 * (cls == "dog"), 90)).save(folder / f"{k}.png")
    with pytest.raises(FileNotFoundError, match="--test-per-class"):
        load_protocol("folders", str(tmp_path), "multi-class", 32, normal=["cat", "dog"])
    protocol = load_protocol("folders", str(tmp_path), "multi-class", 32, normal=["cat", "dog"], test_per_class=2)
    assert protocol.setting.n_train == 8  # 4 of each normal class left for training
    assert (protocol.setting.n_test_normal, protocol.setting.n_test_anomalous) == (4, 2)
    train_files = {protocol.train.dataset.paths[i] for i in protocol.train.indices}
    test_files = {protocol.test.images.paths[i] for i in protocol.test.index}
    assert not train_files & test_files
    assert main(["run", "--method", "knn", "--weights", "random", "--image-size", "32", "--no-progress",
                 "--data-format", "folders", "--data", str(tmp_path), "--protocol", "uni-class",
                 "--normal-classes", "cat", "--test-per-class", "2", "--out", str(tmp_path / "out")]) == 0
