"""Cross-class splits: named MVTec AD and industrial splits, generic 'a,b->c' and clear errors."""

from __future__ import annotations

import pytest

from omniad.data.protocols import (
    MVTEC_OBJECTS,
    MVTEC_TEXTURES,
    NAMED_SPLITS,
    category_group,
    cross_class_split,
)


def test_mvtec_groups_are_the_15_categories():
    assert len(MVTEC_OBJECTS) == 10 and len(MVTEC_TEXTURES) == 5
    assert not set(MVTEC_OBJECTS) & set(MVTEC_TEXTURES)
    assert set(category_group("mvtec:all")) == set(MVTEC_OBJECTS) | set(MVTEC_TEXTURES)


def test_paper_splits_by_name():
    train, test = cross_class_split("mvtec:textures->objects")
    assert train == list(MVTEC_TEXTURES) and test == list(MVTEC_OBJECTS)
    train, test = cross_class_split("mvtec:objects->textures")
    assert train == list(MVTEC_OBJECTS) and test == list(MVTEC_TEXTURES)


def test_industrial_splits():
    assert cross_class_split("magnetic_tile->kolektor") == (["magnetic_tile"], ["kolektor"])
    assert cross_class_split(" kolektor -> magnetic_tile ") == (["kolektor"], ["magnetic_tile"])


def test_generic_split_keeps_order_and_drops_duplicates():
    assert cross_class_split("b, a,b -> c,d") == (["b", "a"], ["c", "d"])
    # within a dataset prefix groups and single categories mix
    train, test = cross_class_split("mvtec:textures,bottle->cable,zipper")
    assert train == list(MVTEC_TEXTURES) + ["bottle"] and test == ["cable", "zipper"]


def test_every_named_split_resolves_to_disjoint_sides():
    for name in NAMED_SPLITS:
        train, test = cross_class_split(name)
        assert train and test and not set(train) & set(test)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("bottle,cable", "seen->unseen"),
        ("a->", "empty side"),
        ("->b", "empty side"),
        ("a->b->c", "more than one"),
        ("a,b->b", "same categories"),
        ("visa:textures->objects", "unknown dataset prefix"),
        ("mvtec:textures->all", "same categories"),
    ],
)
def test_bad_splits_raise_clear_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        cross_class_split(spec)


def test_unknown_group_lists_the_known_ones():
    with pytest.raises(KeyError, match="mvtec:textures"):
        category_group("mvtec:fabrics")
