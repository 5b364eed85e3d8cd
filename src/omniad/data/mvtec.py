"""Reader for MVTec-style folders: one or several roots, any subset of their categories.

Layout of each root (MVTec AD, MPDD, VisA after its 1cls split, BTAD, and omniad's synthetic sets)::

    <root>/<category>/train/good/*.png              normal training images ("ok" instead of "good" for BTAD)
    <root>/<category>/test/good/*.png               normal test images
    <root>/<category>/test/<defect type>/*.png      defective test images
    <root>/<category>/ground_truth/<defect type>/<stem>_mask.png   (or <stem>.png, .bmp, .tif: BTAD, VisA)

A category without ``ground_truth/`` is image-level only: its samples have ``has_mask=False`` and all-zero
masks.
The folder structure is checked when the dataset is built (so a missing mask fails before hours of training);
pixels are read lazily in ``__getitem__``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import Dataset

from omniad.data.images import (
    IMAGE_EXTENSIONS,
    Size,
    read_image,
    read_image_hw,
    read_mask,
    resize_mask,
)
from omniad.types import Sample

NORMAL_FOLDERS = ("good", "ok")  # "ok": BTAD
MASK_SUFFIXES = ("_mask", "")  # "<stem>_mask.png": MVTec AD, MPDD; "<stem>.png": BTAD, VisA 1cls
MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff")
_SPLITS = ("train", "test")
_MAX_LISTED = 5

PathLike = str | os.PathLike


@dataclass(frozen=True)
class SampleRecord:
    """Where one sample lives on disk and what it is (no pixels).

    Attributes:
        path: the image file.
        mask_path: its ground-truth mask, or None (normal image, or a category without masks).
        label: 0 = normal, 1 = defective.
        category: product type (metadata for evaluation only).
        defect_type: "good" for normal images, else the test folder name.
        has_mask: whether the category has pixel ground truth.
    """

    path: Path
    mask_path: Path | None
    label: int
    category: str
    defect_type: str
    has_mask: bool


class SkippedFile(NamedTuple):
    """An entry of an image folder that the reader does not use, and why."""

    path: Path
    reason: str


def _images_in(folder: Path, skipped: list[SkippedFile]) -> list[Path]:
    """Image files directly in ``folder``, sorted by name. Every other entry (a sub-folder, a broken link, a
    file of another type) is appended to ``skipped`` with its reason: a file that is not used is reported,
    never dropped silently."""
    images: list[Path] = []
    for entry in sorted(folder.iterdir()):
        if entry.is_symlink() and not entry.exists():
            skipped.append(SkippedFile(entry, f"broken symbolic link (its target {os.readlink(entry)} does not exist)"))
        elif entry.is_dir():
            skipped.append(SkippedFile(entry, f"sub-folder, not searched: images must lie directly in {folder}"))
        elif not entry.is_file():
            skipped.append(SkippedFile(entry, "not a regular file"))
        elif entry.suffix.lower() not in IMAGE_EXTENSIONS:
            skipped.append(SkippedFile(entry, f"not an image file name (expected {', '.join(IMAGE_EXTENSIONS)})"))
        else:
            images.append(entry)
    return images


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _normal_folder(parent: Path) -> Path | None:
    for name in NORMAL_FOLDERS:
        if (parent / name).is_dir():
            return parent / name
    return None


def _listing(paths: Sequence[object]) -> str:
    shown = ", ".join(str(p) for p in paths[:_MAX_LISTED])
    return shown + (f", ... ({len(paths)} in all)" if len(paths) > _MAX_LISTED else "")


def list_categories(root: PathLike) -> list[str]:
    """Sorted names of the category folders under ``root`` (folders holding ``train/`` or ``test/``).

    Raises:
        FileNotFoundError: ``root`` does not exist or is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root not found (or not a folder): {root}")
    return [p.name for p in _subfolders(root) if any((p / split).is_dir() for split in _SPLITS)]


def _find_mask(gt_folder: Path, stem: str, index: dict[str, Path]) -> Path | None:
    for suffix in MASK_SUFFIXES:
        for ext in MASK_EXTENSIONS:
            hit = index.get(f"{stem}{suffix}{ext}")
            if hit is not None:
                return hit
    return None


def _mask_index(gt_folder: Path) -> dict[str, Path]:
    """File name (extension lower-cased) -> path, so that ``000.PNG`` and ``000.png`` both match."""
    if not gt_folder.is_dir():
        return {}
    return {p.stem + p.suffix.lower(): p for p in gt_folder.iterdir() if p.is_file()}


def _train_records(folder: Path, category: str, has_mask: bool, skipped: list[SkippedFile]) -> list[SampleRecord]:
    normal = _normal_folder(folder / "train")
    if normal is None:
        raise FileNotFoundError(
            f"category {category!r}: no normal training folder {folder / 'train' / 'good'} (or train/ok)"
        )
    own: list[SkippedFile] = []
    images = _images_in(normal, own)
    skipped += own
    if not images:
        also = f"; it holds only {_listing([f'{s.path.name} ({s.reason})' for s in own])}" if own else ""
        raise ValueError(f"category {category!r}: no images ({', '.join(IMAGE_EXTENSIONS)}) in {normal}{also}")
    return [SampleRecord(p, None, 0, category, "good", has_mask) for p in images]


def _test_records(folder: Path, category: str, has_mask: bool, skipped: list[SkippedFile]) -> list[SampleRecord]:
    test = folder / "test"
    if not test.is_dir():
        raise FileNotFoundError(f"category {category!r}: no test folder {test}")
    records: list[SampleRecord] = []
    missing: list[Path] = []
    # Normal images first, then defect types in name order: a stable order for reports and seeds.
    kinds = sorted(_subfolders(test), key=lambda p: (p.name not in NORMAL_FOLDERS, p.name))
    for kind in kinds:
        images = _images_in(kind, skipped)
        if kind.name in NORMAL_FOLDERS:
            records += [SampleRecord(p, None, 0, category, "good", has_mask) for p in images]
            continue
        gt_folder = folder / "ground_truth" / kind.name
        index = _mask_index(gt_folder) if has_mask else {}
        for image in images:
            mask = _find_mask(gt_folder, image.stem, index) if has_mask else None
            if has_mask and mask is None:
                missing.append(image)
            records.append(SampleRecord(image, mask, 1, category, kind.name, has_mask))
    if missing:
        raise FileNotFoundError(
            f"category {category!r} has ground_truth/ but {len(missing)} defective test image(s) lack a mask "
            f"(looked for ground_truth/<type>/<stem>_mask.png or <stem>.png/.bmp/.tif): {_listing(missing)}"
        )
    if not records:
        raise ValueError(f"category {category!r}: no test images under {test}")
    return records


class MVTecDataset(Dataset):
    """Samples from MVTec-style folders, resized to ``image_size``; a torch ``Dataset`` of ``Sample``.

    Args:
        roots: one dataset root or a list of them; their categories are pooled.
        categories: a category name or a list of names to keep (default: every category under every root).
        split: "train" (normal images only) or "test" (normal and defective).
        image_size: side of the square output (an int), an (H, W) pair, None to keep each file's size, or a
            size rule from ``omniad.data.images`` (``KeepAspect``): what ``detector.read_size`` gives.
        draft: decode JPEGs at least twice ``image_size`` on both sides at a reduced scale before the resize
            (``read_image``'s ``draft``); on by default, as ``predict``'s, so that a model is trained on images
            pre-processed as the ones it scores. False: full decoding (bit-identical pre-processing). Masks are
            always read at full size.

    Attributes:
        categories: the selected category names, sorted.
        samples: one ``SampleRecord`` per image, in a stable order (category, normal first, type, file name).
        has_masks: category -> whether it has pixel ground truth (``ground_truth/``).
        roots: the resolved roots.
        skipped: every entry of the image folders read (train/good, test/<type>) that is not used, with the
            reason (``SkippedFile``): sub-folders, broken symbolic links, files that are not images by name.
            Unreadable image files are not listed here: reading them raises an ``ImageReadError`` naming them.

    Raises:
        FileNotFoundError: a missing root, category folder, train/good or test folder, or missing masks.
        ValueError: a root without categories, an unknown category, a category under two roots, an empty
            folder.
    """

    def __init__(
        self,
        roots: PathLike | Sequence[PathLike],
        categories: str | Sequence[str] | None = None,
        split: str = "train",
        image_size: Size | None = 256,
        draft: bool = True,
    ) -> None:
        if split not in _SPLITS:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if isinstance(image_size, int) and image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        root_list = [roots] if isinstance(roots, (str, os.PathLike)) else list(roots)
        if not root_list:
            raise ValueError("no dataset root given")
        self.roots = [Path(r) for r in root_list]
        self.split = split
        self.image_size = image_size
        self.draft = draft

        found: dict[str, Path] = {}
        for root in self.roots:
            names = list_categories(root)
            if not names:
                raise ValueError(
                    f"no categories under {root}: expected folders like {root}/<category>/train/good"
                )
            for name in names:
                if name in found:
                    raise ValueError(
                        f"category {name!r} is under two roots: {found[name] / name} and {root / name}; "
                        "rename one or pass the roots separately"
                    )
                found[name] = root

        if categories is None:
            selected = sorted(found)
        else:
            selected = [categories] if isinstance(categories, str) else list(categories)
            unknown = [c for c in selected if c not in found]
            if unknown:
                raise ValueError(f"unknown categories {unknown}; available: {sorted(found)}")
            selected = sorted(set(selected))
        self.categories: list[str] = selected

        self.has_masks: dict[str, bool] = {}
        self.samples: list[SampleRecord] = []
        self.skipped: list[SkippedFile] = []
        for name in selected:
            folder = found[name] / name
            has_mask = (folder / "ground_truth").is_dir()
            self.has_masks[name] = has_mask
            reader = _train_records if split == "train" else _test_records
            self.samples += reader(folder, name, has_mask, self.skipped)

    def __len__(self) -> int:
        return len(self.samples)

    def image_hw(self, index: int) -> tuple[int, int] | None:
        """(height, width) of sample ``index`` as read, from the file's header (no decoding); None when the
        dataset resizes (the size then follows ``image_size``)."""
        return read_image_hw(self.samples[index].path) if self.image_size is None else None

    def __getitem__(self, index: int) -> Sample:
        record = self.samples[index]
        image = read_image(record.path, self.image_size, draft=self.draft)
        if record.mask_path is not None:
            mask = read_mask(record.mask_path)
            # the file's own size, from its header: what the mask must match (the image read is resized)
            height, width = image.shape[-2:] if self.image_size is None else read_image_hw(record.path)
            if tuple(mask.shape) != (height, width):
                raise ValueError(
                    f"mask {record.mask_path} is {mask.shape[1]}x{mask.shape[0]} (width x height) but its "
                    f"image {record.path} is {width}x{height}"
                )
            if self.image_size is not None:
                mask = resize_mask(mask, self.image_size)
        else:
            mask = torch.zeros(image.shape[-2:])
        return Sample(
            image=image,
            mask=mask,
            label=record.label,
            category=record.category,
            defect_type=record.defect_type,
            path=str(record.path),
            has_mask=record.has_mask,
        )

    @property
    def labels(self) -> list[int]:
        """0/1 label of every sample, without reading any pixels."""
        return [r.label for r in self.samples]

    def counts(self) -> dict[str, dict[str, int]]:
        """category -> {defect type: number of images} ("good" for normal images), without reading pixels."""
        out: dict[str, dict[str, int]] = {c: {} for c in self.categories}
        for r in self.samples:
            out[r.category][r.defect_type] = out[r.category].get(r.defect_type, 0) + 1
        return out

    def __repr__(self) -> str:
        return (
            f"MVTecDataset(split={self.split!r}, categories={self.categories}, n={len(self)}, "
            f"image_size={self.image_size}, draft={self.draft})"
        )
