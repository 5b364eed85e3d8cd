"""Readers for class-labelled image sets (semantic and multi-object novelty): each image comes with the SET of its
class or object-category names.

Three formats, each read into a ``LabelledImages`` dataset (float (3, H, W) images in [0, 1], grey replicated to
three channels like ``read_image`` does):

* ``read_class_folders``: ``<root>/<split>/<class>/*.png|jpg`` (CIFAR-10 image dumps, torchvision's ImageFolder);
  an image's label set is ``{<class>}``.
* ``read_idx``: the MNIST IDX files ``<prefix>-images-idx3-ubyte[.gz]`` and ``<prefix>-labels-idx1-ubyte[.gz]``
  (prefix ``train`` or ``t10k``: MNIST, Fashion-MNIST); label set ``{"<digit>"}`` (or a name from ``class_names``).
* ``read_coco``: COCO instance annotations (``instances.json`` + an image folder); an image's label set is the set
  of the category names of its annotations (empty for an image without any).

Every problem of the files is a ``ValueError`` / ``FileNotFoundError`` naming the file and what is wrong.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from omniad.data.images import read_image, resize_image
from omniad.data.mvtec import SkippedFile, _images_in, _listing, _subfolders

PathLike = str | os.PathLike

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
IDX_PREFIXES = {"train": "train", "test": "t10k"}
_IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension


class LabelledImages(Dataset):
    """Images with a set of class (or object-category) names each; ``dataset[i]`` is the (3, H, W) image.

    Attributes:
        name: what the set is (the root it was read from and its split), for reports and errors.
        class_names: every class / category name of the set, in the format's order.
        labels: the label set (a frozenset of names) of each image; read without decoding any pixels.
        paths: the file of each image (``<file>#<index>`` for images stored in one file).
        skipped: entries of the image folders that are not used, with the reason (``SkippedFile``).
        image_size: side of the square output (int), an (H, W) pair, or None to keep each image's size.

    ``load`` gives image ``index`` at its own size or already at ``image_size`` (the file readers read at the
    size, to draft-decode large JPEGs: ``read_image``); ``dataset[i]`` resizes what is not.
    """

    def __init__(self, name: str, class_names: Sequence[str], labels: Sequence[frozenset[str]],
                 paths: Sequence[str], load: Callable[[int], Tensor], image_size: int | tuple[int, int] | None,
                 skipped: Sequence[SkippedFile] = ()) -> None:
        if len(labels) != len(paths):
            raise ValueError(f"{name}: {len(labels)} label sets for {len(paths)} images")
        if isinstance(image_size, int) and image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.name = name
        self.class_names = list(class_names)
        self.labels = list(labels)
        self.paths = list(paths)
        self.skipped = list(skipped)
        self.image_size = image_size
        self._load = load

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Tensor:
        image = self._load(index)
        return image if self.image_size is None else resize_image(image, self.image_size)

    def counts(self) -> dict[str, int]:
        """class name -> number of images whose label set holds it (no pixels read)."""
        out = dict.fromkeys(self.class_names, 0)
        for labels in self.labels:
            for name in labels:
                out[name] += 1
        return out

    def __repr__(self) -> str:
        return f"LabelledImages({self.name!r}, n={len(self)}, classes={len(self.class_names)})"


# ------------------------------------------------------------------ class per folder
def read_class_folders(root: PathLike, split: str = "train", image_size: int | tuple[int, int] | None = 256, *,
                       draft: bool = True) -> LabelledImages:
    """``<root>/<split>/<class>/*`` (one folder per class); the class is the folder name.

    Entries of the class folders that are not image files (sub-folders, broken links, other files) are listed in
    ``skipped``; an image file that cannot be decoded raises ``ImageReadError`` naming it when it is read.
    ``draft``: decode JPEGs at least twice ``image_size`` at a reduced scale (``read_image``); False: full
    decoding.

    Raises:
        FileNotFoundError: no ``<root>/<split>`` folder.
        ValueError: no class folders, or a class folder without images.
    """
    folder = Path(root) / split
    if not folder.is_dir():
        raise FileNotFoundError(f"no {split} folder {folder} (expected {root}/{split}/<class>/*.png)")
    classes = _subfolders(folder)
    if not classes:
        raise ValueError(f"no class folders in {folder} (expected {folder}/<class>/*.png)")
    skipped: list[SkippedFile] = []
    paths: list[Path] = []
    labels: list[frozenset[str]] = []
    for class_folder in classes:
        images = _images_in(class_folder, skipped)
        if not images:
            raise ValueError(f"class folder {class_folder} holds no images (.png, .jpg, ...)")
        paths += images
        labels += [frozenset({class_folder.name})] * len(images)
    return LabelledImages(f"{root} ({split})", [c.name for c in classes], labels, [str(p) for p in paths],
                          lambda i: read_image(paths[i], image_size, draft=draft), image_size, skipped)


# ------------------------------------------------------------------ MNIST IDX
def _idx_file(root: Path, prefix: str, kind: str) -> Path:
    for name in (f"{prefix}-{kind}-ubyte", f"{prefix}-{kind}-ubyte.gz", f"{prefix}-{kind}.ubyte"):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"no IDX file {root / f'{prefix}-{kind}-ubyte'}[.gz] (MNIST layout)")


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise ValueError(f"{path}: cannot read ({err})") from err


def read_idx_array(path: PathLike, magic: int, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes as a numpy array (no copy of the payload), with its header checked.

    Raises:
        ValueError: a wrong magic number (not an IDX file of unsigned bytes with ``ndim`` dimensions), a
            file shorter or longer than its header says (truncated), or a zero dimension.
    """
    path = Path(path)
    data = _read_bytes(path)
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX file ({len(data)} bytes, shorter than its {header}-byte header)")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: bad IDX magic number 0x{found:08x}, expected 0x{magic:08x} (unsigned bytes, "
                         f"{ndim} dimension{'s' if ndim > 1 else ''}); is it the right file?")
    shape = tuple(int.from_bytes(data[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim))
    if 0 in shape:
        raise ValueError(f"{path}: IDX header gives a zero dimension {shape}")
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise ValueError(f"{path}: {what} IDX file: {len(data)} bytes, the header {shape} needs {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_idx(root: PathLike, split: str = "train", image_size: int | tuple[int, int] | None = 256,
             class_names: Sequence[str] | None = None) -> LabelledImages:
    """MNIST / Fashion-MNIST in the IDX format: ``<root>/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``.

    Args:
        root: the folder holding the four files.
        split: ``train`` or ``test`` (the ``t10k`` files).
        image_size: output side (the 28 x 28 images are resized), or None to keep them.
        class_names: name of label 0, 1, ... (e.g. ``FASHION_MNIST_CLASSES``); default ``"0"``, ``"1"``, ...

    Raises:
        FileNotFoundError: a missing file.
        ValueError: bad magic numbers, truncated files, image and label counts that differ, or a label with no
            name in ``class_names``.
    """
    if split not in IDX_PREFIXES:
        raise ValueError(f"split must be one of {sorted(IDX_PREFIXES)}, got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"IDX folder not found: {root}")
    prefix = IDX_PREFIXES[split]
    image_file, label_file = _idx_file(root, prefix, "images-idx3"), _idx_file(root, prefix, "labels-idx1")
    images = read_idx_array(image_file, _IDX_IMAGES_MAGIC, 3)
    values = read_idx_array(label_file, _IDX_LABELS_MAGIC, 1)
    if len(images) != len(values):
        raise ValueError(f"{image_file} holds {len(images)} images but {label_file} holds {len(values)} labels")
    n_classes = int(values.max()) + 1
    names = [str(k) for k in range(n_classes)] if class_names is None else [str(c) for c in class_names]
    if n_classes > len(names):
        raise ValueError(f"{label_file}: label {n_classes - 1} has no name among the {len(names)} class names given")
    sets = [frozenset({name}) for name in names]
    labels = [sets[v] for v in values.tolist()]
    paths = [f"{image_file}#{i}" for i in range(len(images))]

    def load(index: int) -> Tensor:
        return torch.from_numpy(images[index].astype(np.float32) / 255.0)[None].expand(3, -1, -1).contiguous()

    return LabelledImages(f"{root} ({split})", names, labels, paths, load, image_size)


# ------------------------------------------------------------------ COCO instances
def find_coco_files(root: PathLike) -> tuple[Path, Path]:
    """(annotation file, image folder) of a COCO-style folder: ``annotations/instances*.json`` or
    ``instances*.json``, and ``images/`` (or the folder itself)."""
    root = Path(root)
    if root.is_file():
        return root, root.parent.parent / "images" if root.parent.name == "annotations" else root.parent
    if not root.is_dir():
        raise FileNotFoundError(f"COCO folder not found: {root}")
    found = sorted(root.glob("annotations/instances*.json")) + sorted(root.glob("instances*.json"))
    if not found:
        raise FileNotFoundError(f"no instances*.json in {root} or {root / 'annotations'} (COCO instance annotations)")
    if len(found) > 1:
        raise ValueError(f"several annotation files in {root}: {_listing(found)}; pass the one to read")
    images = root / "images"
    return found[0], images if images.is_dir() else root


def read_coco(root: PathLike, images: PathLike | None = None,
              image_size: int | tuple[int, int] | None = 256, *, draft: bool = True) -> LabelledImages:
    """COCO instance annotations: each image's label set = the names of the categories annotated in it.

    Args:
        root: the annotation JSON, or a folder holding ``annotations/instances*.json`` (or ``instances*.json``)
            and ``images/``.
        images: the image folder (default: found beside the annotations, see ``find_coco_files``).
        image_size: output side, or None to keep each file's size.
        draft: decode JPEGs at least twice ``image_size`` at a reduced scale (``read_image``); False: full
            decoding.

    Raises:
        FileNotFoundError: no annotation file, or image entries naming files that do not exist.
        ValueError: malformed JSON, an annotation naming an unknown image or category id, duplicate ids.
    """
    annotation_file, default_images = find_coco_files(root)
    folder = Path(images) if images is not None else default_images
    try:
        content = json.loads(annotation_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{annotation_file}: not readable JSON ({err})") from err
    if not isinstance(content, dict) or not all(isinstance(content.get(k), list) for k in ("images", "categories")):
        raise ValueError(f"{annotation_file}: not COCO instances (needs lists 'images' and 'categories')")
    try:
        categories = {int(c["id"]): str(c["name"]) for c in content["categories"]}
        entries = [(int(e["id"]), str(e["file_name"])) for e in content["images"]]
        annotations = [(int(a["image_id"]), int(a["category_id"])) for a in content.get("annotations", [])]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{annotation_file}: malformed entry ({type(err).__name__}: {err})") from err
    ids = [image_id for image_id, _ in entries]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{annotation_file}: duplicate image ids")
    position = {image_id: k for k, image_id in enumerate(ids)}
    names: list[set[str]] = [set() for _ in entries]
    for image_id, category_id in annotations:
        if image_id not in position:
            raise ValueError(f"{annotation_file}: an annotation names image id {image_id}, which has no entry in "
                             "'images'")
        if category_id not in categories:
            raise ValueError(f"{annotation_file}: an annotation of image id {image_id} names unknown category id "
                             f"{category_id}")
        names[position[image_id]].add(categories[category_id])
    paths = [folder / file_name for _, file_name in entries]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{annotation_file}: {len(missing)} image entries name files that do not exist "
                                f"in {folder}: {_listing(missing)}")
    return LabelledImages(f"{annotation_file}", [categories[k] for k in sorted(categories)],
                          [frozenset(n) for n in names], [str(p) for p in paths],
                          lambda i: read_image(paths[i], image_size, draft=draft), image_size)


def split_per_class(data: LabelledImages, test_per_class: int, seed: int = 0
                    ) -> tuple[LabelledImages, LabelledImages]:
    """A seeded train / test split of a labelled set that has no test split of its own (e.g. the CIFAR-10
    training subset as class folders): ``test_per_class`` images of every label set go to the test, the rest to
    the training split. Every image is in exactly one of the two; the split depends only on ``seed``.

    Raises:
        ValueError: ``test_per_class`` is not a whole number >= 1, or a class has no image left for training.
    """
    if not isinstance(test_per_class, int) or isinstance(test_per_class, bool) or test_per_class < 1:
        raise ValueError(f"test_per_class must be a whole number >= 1, got {test_per_class!r}")
    groups: dict[frozenset[str], list[int]] = {}
    for i, labels in enumerate(data.labels):
        groups.setdefault(labels, []).append(i)
    rng = np.random.default_rng(seed)
    test: list[int] = []
    for labels, members in groups.items():
        if len(members) <= test_per_class:
            raise ValueError(f"{data.name}: {'+'.join(sorted(labels)) or '(no label)'} has {len(members)} images, "
                             f"too few to hold out {test_per_class} for the test and train on the rest")
        test += rng.choice(members, size=test_per_class, replace=False).tolist()
    held = set(test)
    train = [i for i in range(len(data)) if i not in held]
    return _subset(data, train, "train"), _subset(data, sorted(held), "test")


def _subset(data: LabelledImages, index: list[int], split: str) -> LabelledImages:
    return LabelledImages(f"{data.name}, seeded {split} split", data.class_names, [data.labels[i] for i in index],
                          [data.paths[i] for i in index], lambda k: data._load(index[k]), data.image_size)


FORMATS = ("folders", "idx", "coco")


def read_labelled(data_format: str, root: PathLike, split: str = "train",
                  image_size: int | tuple[int, int] | None = 256, *, draft: bool = True) -> LabelledImages:
    """Read a labelled set by format name (``folders``, ``idx``, ``coco``; COCO has no splits: ``split`` is
    ignored). ``draft``: JPEG draft decoding of the file formats (``read_image``; IDX holds no JPEGs)."""
    if data_format == "folders":
        return read_class_folders(root, split, image_size, draft=draft)
    if data_format == "idx":
        return read_idx(root, split, image_size)
    if data_format == "coco":
        return read_coco(root, image_size=image_size, draft=draft)
    raise ValueError(f"unknown labelled data format {data_format!r}; known: {', '.join(FORMATS)}")


__all__ = [
    "FASHION_MNIST_CLASSES",
    "FORMATS",
    "LabelledImages",
    "find_coco_files",
    "read_class_folders",
    "read_coco",
    "read_idx",
    "read_idx_array",
    "read_labelled",
    "split_per_class",
]
