"""Evaluation protocols as data: named category groups and cross-class (one-for-all) splits.

Cross-class = train on the normal images of the *seen* categories, test on the *unseen* ones
(PMAD, AAAI 2023). A split is written ``"<seen> -> <unseen>"``, each side a comma-separated list of category names
or group names, optionally prefixed by a dataset (``"mvtec:textures->objects"``). Named splits:

================================  =====================================================
``mvtec:textures->objects``       MVTec AD's 5 textures -> its 10 objects
``mvtec:objects->textures``       the 10 objects -> the 5 textures
``magnetic_tile->kolektor``       the two-type industrial set (kolektor, magnetic_tile)
``kolektor->magnetic_tile``       and the reverse
``a,b->c,d``                      any categories (each side may also name a group)
================================  =====================================================
"""

from __future__ import annotations

MVTEC_OBJECTS: tuple[str, ...] = (
    "bottle", "cable", "capsule", "hazelnut", "metal_nut", "pill", "screw", "toothbrush", "transistor", "zipper",
)
MVTEC_TEXTURES: tuple[str, ...] = ("carpet", "grid", "leather", "tile", "wood")
INDUSTRIAL: tuple[str, ...] = ("magnetic_tile", "kolektor")

# group names usable on either side of a split, per dataset prefix ("" = no prefix)
GROUPS: dict[str, dict[str, tuple[str, ...]]] = {
    "mvtec": {
        "objects": MVTEC_OBJECTS,
        "textures": MVTEC_TEXTURES,
        "all": MVTEC_TEXTURES + MVTEC_OBJECTS,
    },
    "industrial": {"all": INDUSTRIAL},
}

# the splits the papers and this project's benchmarks use, listed by ``list_cross_class_splits``
NAMED_SPLITS: tuple[str, ...] = (
    "mvtec:textures->objects",
    "mvtec:objects->textures",
    "magnetic_tile->kolektor",
    "kolektor->magnetic_tile",
)


def category_group(name: str) -> list[str]:
    """The categories of a group, e.g. ``category_group("mvtec:textures")``; an unknown group raises KeyError."""
    prefix, _, group = name.rpartition(":")
    groups = GROUPS.get(prefix.strip().lower())
    if groups is None or group.strip().lower() not in groups:
        known = [f"{p}:{g}" for p, gs in GROUPS.items() for g in gs]
        raise KeyError(f"unknown category group {name!r}; known groups: {', '.join(known)}")
    return list(groups[group.strip().lower()])


def _side(text: str, prefix: str, spec: str) -> list[str]:
    names: list[str] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        groups = GROUPS.get(prefix, {})
        for category in groups.get(item.lower(), (item,)):
            if category not in names:
                names.append(category)
    if not names:
        raise ValueError(f"cross-class split {spec!r} has an empty side; write e.g. 'a,b->c'")
    return names


def cross_class_split(spec: str) -> tuple[list[str], list[str]]:
    """Resolve a cross-class split into (train categories, test categories).

    Args:
        spec: ``"[dataset:]<seen> -> <unseen>"``. Each side is a comma-separated list of categories; within a
            ``dataset:`` prefix (``mvtec``, ``industrial``) a side may also be a group name (``textures``,
            ``objects``, ``all``). Whitespace around names is ignored; category names keep their case.

    Returns:
        (seen, unseen) category lists, in the order written (groups expanded in their listed order), without
        duplicates. Seen and unseen may not share a category: that would not be cross-class.

    Raises:
        ValueError: no "->", an empty side, an unknown dataset prefix, or a category on both sides.

    Examples:
        >>> cross_class_split("mvtec:textures->objects")[0]
        ['carpet', 'grid', 'leather', 'tile', 'wood']
        >>> cross_class_split("magnetic_tile->kolektor")
        (['magnetic_tile'], ['kolektor'])
    """
    if not isinstance(spec, str) or "->" not in spec:
        raise ValueError(
            f"a cross-class split looks like 'seen->unseen' (e.g. 'mvtec:textures->objects' or 'a,b->c'), "
            f"got {spec!r}; named splits: {', '.join(NAMED_SPLITS)}"
        )
    body = spec.strip()
    prefix = ""
    head, sep, rest = body.partition(":")
    if sep and "->" not in head:
        prefix = head.strip().lower()
        body = rest
        if prefix not in GROUPS:
            raise ValueError(f"unknown dataset prefix {prefix!r} in {spec!r}; known: {', '.join(GROUPS)}")
    seen_text, _, unseen_text = body.partition("->")
    if "->" in unseen_text:
        raise ValueError(f"cross-class split {spec!r} has more than one '->'")
    seen, unseen = _side(seen_text, prefix, spec), _side(unseen_text, prefix, spec)
    shared = sorted(set(seen) & set(unseen))
    if shared:
        raise ValueError(f"cross-class split {spec!r} trains and tests on the same categories: {shared}")
    return seen, unseen


def list_cross_class_splits() -> list[str]:
    """The named cross-class splits (any ``"a,b->c"`` is accepted too)."""
    return list(NAMED_SPLITS)


__all__ = [
    "GROUPS",
    "INDUSTRIAL",
    "MVTEC_OBJECTS",
    "MVTEC_TEXTURES",
    "NAMED_SPLITS",
    "category_group",
    "cross_class_split",
    "list_cross_class_splits",
]
