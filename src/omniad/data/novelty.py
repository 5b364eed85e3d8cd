"""Semantic and multi-object novelty protocols over class-labelled sets (``omniad.data.labelled``).

Every protocol is one rule with a different choice of the normal classes: an image is **normal when its label set
holds at least one normal class**, anomalous otherwise (an image without labels is anomalous).

================  ===========================================================================================
``uni-class``     one class normal; train on its training images; test on the whole test set
``multi-class``   several classes normal, trained together without labels; the CIFAR-style 5-vs-5 splits are
                  built in (``SPLITS_5V5``: ``5v5-first`` {0..4}, ``5v5-last`` {5..9}, ``5v5-even``, ``5v5-odd``)
``leave-one-out`` every class but one normal; the held-out class is the anomaly
``multi-object``  normal = the image contains at least one chosen category (other objects may be in it too);
                  without a separate test set, a seeded share of the normal images is held out for testing
================  ===========================================================================================

Training sets hold normal images only and carry no labels (every detector's ``fit`` takes them). Test sets are
datasets of ``omniad.types.Sample`` (label 0 normal / 1 anomalous, no masks) that ``omniad.metrics.evaluate``
scores; they carry their ``setting`` (a ``NoveltySetting``), which the report states and which defines its rows:

* **per-class row** ``<c>`` (one per normal class): the normal test images holding ``c`` plus *all* anomalous test
  images, so each row is a full normal-vs-anomalous AUROC. In uni-class it is the one row (the whole test set).
* **mean**: mean of those rows; **mixed**: the whole test set in one ranking (the papers' figure for every protocol).

Image-level metrics only (these sets have no masks). Optional seeded caps per class (``max_train_per_class``,
``max_test_per_class``) make CPU benchmarks possible; the setting records them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from omniad.data.labelled import LabelledImages, read_labelled, split_per_class
from omniad.types import Sample

PROTOCOLS = ("uni-class", "multi-class", "leave-one-out", "multi-object")

# CIFAR-style 5-vs-5 splits (UniAD's CIFAR-10 setting; the README of the semantic data): class indices
SPLITS_5V5: dict[str, tuple[int, ...]] = {
    "5v5-first": (0, 1, 2, 3, 4),
    "5v5-last": (5, 6, 7, 8, 9),
    "5v5-even": (0, 2, 4, 6, 8),
    "5v5-odd": (1, 3, 5, 7, 9),
}
ROWS = ("one row per normal class: that class's normal test images plus all anomalous test images; mean = mean "
        "of those rows; mixed = the whole test set in one ranking")


@dataclass(frozen=True)
class NoveltySetting:
    """What is normal and what is anomalous in one novelty run, and what the report's rows are.

    Attributes:
        protocol: one of ``PROTOCOLS``.
        data: the labelled sets it was built from.
        normal: the normal classes / categories.
        anomalous: the other classes / categories of the data (in multi-object data, they may also appear in
            normal images).
        rows: row name -> indices of the test images in that row.
        n_train, n_test_normal, n_test_anomalous: counts.
        subsampling: the caps and seed used (empty when every image is used).
    """

    protocol: str
    data: str
    normal: tuple[str, ...]
    anomalous: tuple[str, ...]
    rows: dict[str, tuple[int, ...]] = field(repr=False)
    n_train: int = 0
    n_test_normal: int = 0
    n_test_anomalous: int = 0
    subsampling: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """One paragraph for the report."""
        sub = (", ".join(f"{k} {v}" for k, v in self.subsampling.items()) if self.subsampling
               else "none (every image)")
        return (f"{self.protocol} novelty on {self.data}: normal = {_names(self.normal)}; anomalous = "
                f"{_names(self.anomalous)}. Training: {self.n_train} normal images, no labels. Test: "
                f"{self.n_test_normal} normal + {self.n_test_anomalous} anomalous images. Rows: {ROWS}. "
                f"Subsampling: {sub}.")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["rows"] = {name: len(index) for name, index in self.rows.items()}  # sizes, not every index
        out["description"] = self.describe()
        return out


def _names(names: Sequence[str]) -> str:
    return "{" + ", ".join(names) + "}" if names else "{} (none)"


class NoveltyTestSet(Dataset):
    """The labelled test images of a protocol as ``Sample`` (label 0/1, an all-zero mask, ``has_mask`` False;
    ``category`` = the image's label set joined by "+", ``defect_type`` "good" for normal images)."""

    def __init__(self, images: LabelledImages, index: Sequence[int], labels: Sequence[int],
                 setting: NoveltySetting) -> None:
        self.images, self.index, self.targets, self.setting = images, list(index), list(labels), setting

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, position: int) -> Sample:
        i = self.index[position]
        image = self.images[i]
        names = "+".join(sorted(self.images.labels[i])) or "(no label)"
        label = self.targets[position]
        return Sample(image, torch.zeros(image.shape[-2:]), label, names, "good" if label == 0 else names,
                      self.images.paths[i], has_mask=False)


@dataclass
class NoveltyProtocol:
    """A protocol's data: ``train`` (normal images only, no labels), ``test`` (a ``NoveltyTestSet``) and its
    ``setting``."""

    train: Dataset
    test: NoveltyTestSet
    setting: NoveltySetting
    # folder entries the reader did not use, per split read ("train", "test"), for the caller to report
    skipped: dict[str, list] = field(default_factory=dict)


def tell_normal_count(detector: Any, setting: NoveltySetting, explicit: Mapping[str, Any]) -> bool:
    """Give a detector that sizes itself by the number of normal classes (its ``n_normal_classes`` parameter:
    mkd's DEFEND keeps 2 x that many prototypes) the count the protocol names, unless ``explicit`` (the user's
    parameters) already sets it. Returns whether it was set. The count is what the user declared normal, never
    read from the training labels."""
    if "n_normal_classes" not in detector.get_params() or "n_normal_classes" in explicit:
        return False
    detector.set_params(n_normal_classes=len(setting.normal))
    return True


def _check_classes(names: Sequence[str], known: Sequence[str], what: str, data: LabelledImages) -> list[str]:
    names = list(dict.fromkeys(str(n) for n in names))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown {what} {unknown} in {data.name}; its classes: {', '.join(known)}")
    if not names:
        raise ValueError(f"no {what} given")
    return names


def _cap(index: list[int], data: LabelledImages, cap: int | None, rng: np.random.Generator) -> list[int]:
    """At most ``cap`` images per label set (per class for single-label data), seeded; order kept."""
    if not cap:
        return index
    groups: dict[frozenset[str], list[int]] = {}
    for i in index:
        groups.setdefault(data.labels[i], []).append(i)
    keep: list[int] = []
    for members in groups.values():
        keep += rng.choice(members, size=min(cap, len(members)), replace=False).tolist()
    return sorted(keep)


def novelty_split(train: LabelledImages, test: LabelledImages | None, normal: Sequence[str], protocol: str,
                  *, max_train_per_class: int | None = None, max_test_per_class: int | None = None,
                  test_fraction: float = 0.5, seed: int = 0) -> NoveltyProtocol:
    """The rule every protocol shares: normal = the label set holds a class of ``normal``.

    Args:
        train: labelled training set (its anomalous images are never used).
        test: labelled test set; None: hold out a seeded ``test_fraction`` of ``train``'s normal images for the
            test, with every anomalous image of ``train`` (the multi-object protocol on one annotated set).
        normal: the normal class / category names.
        protocol: the protocol's name, for the report.
        max_train_per_class, max_test_per_class: seeded caps per class (per label set); None: every image.
        test_fraction: share of the normal images held out when ``test`` is None.
        seed: seed of the caps and the hold-out.

    Raises:
        ValueError: an unknown class, an empty training set, or a test set without normal or anomalous images.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    for name, cap in (("max_train_per_class", max_train_per_class), ("max_test_per_class", max_test_per_class)):
        if cap is not None and (not isinstance(cap, int) or cap < 0):
            raise ValueError(f"{name} must be a whole number >= 0 (0 or None: every image), got {cap!r}")
    normal = _check_classes(normal, train.class_names, "normal classes", train)
    normal_set = set(normal)
    # one stream per use, so that the test subsample is the same whichever classes are normal
    hold_rng, train_rng, test_rng = (np.random.default_rng([seed, k]) for k in range(3))
    train_normal = [i for i, labels in enumerate(train.labels) if labels & normal_set]
    if test is None:
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        order = hold_rng.permutation(len(train_normal))
        n_test = int(round(test_fraction * len(train_normal)))
        held = {train_normal[k] for k in order[:n_test].tolist()}
        test_index = sorted(held | {i for i, labels in enumerate(train.labels) if not labels & normal_set})
        train_normal = [i for i in train_normal if i not in held]
        test = train
    else:
        test_index = list(range(len(test)))
    train_index = _cap(train_normal, train, max_train_per_class, train_rng)
    test_index = _cap(test_index, test, max_test_per_class, test_rng)
    if not train_index:
        raise ValueError(f"{train.name}: no training image holds a normal class {normal}")
    targets = [0 if test.labels[i] & normal_set else 1 for i in test_index]
    n_anomalous = sum(targets)
    if n_anomalous == 0 or n_anomalous == len(targets):
        raise ValueError(f"{test.name}: the test set has {len(targets) - n_anomalous} normal and {n_anomalous} "
                         f"anomalous images for normal = {normal}; it needs both")
    anomalies = tuple(k for k, y in enumerate(targets) if y == 1)
    rows = {name: tuple(sorted({k for k, i in enumerate(test_index) if name in test.labels[i]} | set(anomalies)))
            for name in normal}
    caps = {"max_train_per_class": max_train_per_class, "max_test_per_class": max_test_per_class}
    subsampling = {k: v for k, v in caps.items() if v}
    if test is train:
        subsampling["held-out normal share"] = test_fraction
    if subsampling:
        subsampling["seed"] = seed
    data = train.name if test is train else f"{train.name} / {test.name}"
    setting = NoveltySetting(protocol, data, tuple(normal), tuple(c for c in train.class_names if c not in normal_set),
                             rows, len(train_index), len(targets) - n_anomalous, n_anomalous, subsampling)
    return NoveltyProtocol(Subset(train, train_index), NoveltyTestSet(test, test_index, targets, setting), setting)


def uni_class(train: LabelledImages, test: LabelledImages, normal_class: str, **options: Any) -> NoveltyProtocol:
    """One class normal, every other class anomalous; test on the whole test set (options: ``novelty_split``)."""
    return novelty_split(train, test, [normal_class], "uni-class", **options)


def split_classes(split: str | Sequence[str], class_names: Sequence[str]) -> list[str]:
    """The normal classes of a multi-class split: a name of ``SPLITS_5V5`` (indices into ``class_names``), a
    comma-separated string, or a list of class names."""
    if isinstance(split, str) and split in SPLITS_5V5:
        indices = SPLITS_5V5[split]
        if max(indices) >= len(class_names):
            raise ValueError(f"split {split!r} needs 10 classes; the data has {len(class_names)}")
        return [class_names[k] for k in indices]
    if isinstance(split, str):
        return [s.strip() for s in split.split(",") if s.strip()]
    return [str(s) for s in split]


def multi_class(train: LabelledImages, test: LabelledImages, normal: str | Sequence[str], **options: Any
                ) -> NoveltyProtocol:
    """Several classes normal, trained together without labels. ``normal``: class names or a named split
    (``SPLITS_5V5``: ``5v5-first``, ``5v5-last``, ``5v5-even``, ``5v5-odd``)."""
    return novelty_split(train, test, split_classes(normal, train.class_names), "multi-class", **options)


def leave_one_out(train: LabelledImages, test: LabelledImages, held_out: str, **options: Any) -> NoveltyProtocol:
    """Every class but ``held_out`` normal; ``held_out`` is the anomaly."""
    _check_classes([held_out], train.class_names, "held-out class", train)
    return novelty_split(train, test, [c for c in train.class_names if c != held_out], "leave-one-out", **options)


def multi_object(data: LabelledImages, normal: str | Sequence[str], test: LabelledImages | None = None,
                 **options: Any) -> NoveltyProtocol:
    """Normal = the image contains at least one of the ``normal`` categories; anomalous = none of them. Without
    ``test``, a seeded share (``test_fraction``, default 0.5) of ``data``'s normal images is held out for testing
    together with all its anomalous images."""
    names = [normal] if isinstance(normal, str) else list(normal)
    return novelty_split(data, test, names, "multi-object", **options)


def build_protocol(protocol: str, train: LabelledImages, test: LabelledImages | None, *,
                   normal: Sequence[str] | None = None, split: str | None = None, held_out: str | None = None,
                   **options: Any) -> NoveltyProtocol:
    """One protocol by name, from the options a user gives (what ``omniad run --protocol`` calls).

    Args:
        protocol: one of ``PROTOCOLS``.
        train, test: the labelled sets (``test`` None for multi-object on one annotated set).
        normal: normal classes (uni-class: exactly one; multi-class; multi-object: categories).
        split: multi-class: a named split (``SPLITS_5V5``) instead of ``normal``.
        held_out: leave-one-out: the anomalous class.
        options: ``novelty_split``'s caps, hold-out share and seed.
    """
    if protocol == "uni-class":
        if not normal or len(normal) != 1:
            raise ValueError(f"uni-class takes exactly one normal class (--normal-classes C), got {normal}")
        return uni_class(train, _need(test, protocol), normal[0], **options)
    if protocol == "multi-class":
        if (split is None) == (not normal):
            raise ValueError("multi-class takes either normal classes (--normal-classes A,B) or a named split "
                             f"(--split {'|'.join(SPLITS_5V5)}), one of them")
        return multi_class(train, _need(test, protocol), split if split is not None else normal, **options)
    if protocol == "leave-one-out":
        if held_out is None:
            raise ValueError("leave-one-out needs the held-out (anomalous) class (--held-out C)")
        return leave_one_out(train, _need(test, protocol), held_out, **options)
    if protocol == "multi-object":
        if not normal:
            raise ValueError("multi-object needs the normal categories (--normal-categories person)")
        return multi_object(train, normal, test, **options)
    raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")


def load_protocol(data_format: str, root: str, protocol: str, image_size: int | tuple[int, int] | None = 256,
                  test_per_class: int | None = None, draft: bool = True, **options: Any) -> NoveltyProtocol:
    """Read a labelled set from disk and build a protocol on it: ``read_labelled`` then ``build_protocol``.

    Args:
        data_format: ``folders`` or ``idx`` (train and test splits), or ``coco`` (one annotated set: the
            multi-object protocol holds out a share of its normal images for the test).
        root: the data folder (for COCO: the folder with ``annotations/`` and ``images/``, or the JSON file).
        protocol: one of ``PROTOCOLS``.
        image_size: side the images are resized to.
        test_per_class: ``folders``/``idx``: make the test split from the training split instead, ``test_per_class``
            images of each class held out (seeded by ``seed``; ``split_per_class``), for data without a test
            split of its own (e.g. the CIFAR-10 training subset). None: read the ``test`` split.
        draft: decode JPEGs at least twice ``image_size`` at a reduced scale (``read_image``); False: full
            decoding.
        options: ``build_protocol``'s options (normal, split, held_out, caps, test_fraction, seed).
    """
    train = read_labelled(data_format, root, "train", image_size, draft=draft)
    if test_per_class is not None:
        if data_format == "coco":
            raise ValueError("test_per_class splits class folders or IDX files; COCO's multi-object protocol holds "
                             "out a share of its normal images instead (test_fraction)")
        train, test = split_per_class(train, test_per_class, options.get("seed", 0))
    elif data_format == "coco":
        test = None
    else:
        try:
            test = read_labelled(data_format, root, "test", image_size, draft=draft)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{err}; for data without a test split, hold out images of each class with "
                                    "--test-per-class N (library: test_per_class=N)") from None
    skipped = {split: data.skipped for split, data in (("train", train), ("test", test)) if data is not None}
    return replace(build_protocol(protocol, train, test, **options), skipped=skipped)


def _need(test: LabelledImages | None, protocol: str) -> LabelledImages:
    if test is None:
        raise ValueError(f"the {protocol} protocol needs a test split (data with train and test)")
    return test


__all__ = [
    "PROTOCOLS",
    "SPLITS_5V5",
    "NoveltyProtocol",
    "NoveltySetting",
    "NoveltyTestSet",
    "build_protocol",
    "leave_one_out",
    "load_protocol",
    "multi_class",
    "multi_object",
    "novelty_split",
    "split_classes",
    "tell_normal_count",
    "uni_class",
]
