"""Novelty protocols on hand-made label sets, their image-level reports, and the CLI on a tiny IDX set."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from omniad.cli import main
from omniad.data.labelled import LabelledImages
from omniad.data.novelty import (
    build_protocol,
    leave_one_out,
    multi_class,
    multi_object,
    tell_normal_count,
    uni_class,
)
from omniad.metrics import evaluate
from omniad.registry import create_detector
from omniad.types import AnomalyScores
from test_labelled import tiny_images, write_idx


def labelled(labels: list[set[str]], classes: list[str], name: str = "hand") -> LabelledImages:
    """Image i is a constant grey of value i / len (so a detector can tell images apart), 4 x 4."""
    n = len(labels)
    return LabelledImages(name, classes, [frozenset(s) for s in labels], [f"img{i}" for i in range(n)],
                          lambda i: torch.full((3, 4, 4), i / n), image_size=None)


TEN = [str(k) for k in range(10)]


def ten_classes(per_class: int) -> LabelledImages:
    return labelled([{c} for c in TEN for _ in range(per_class)], TEN)


def train_classes(protocol) -> list[str]:
    data, index = protocol.train.dataset, protocol.train.indices
    return sorted({c for i in index for c in data.labels[i]})


def test_uni_class_trains_on_one_class_and_tests_on_everything():
    train, test = ten_classes(3), ten_classes(2)
    p = uni_class(train, test, "4")
    assert list(p.train.indices) == [12, 13, 14]
    assert len(p.test) == 20 and p.test.targets == [0 if k // 2 == 4 else 1 for k in range(20)]
    assert p.setting.normal == ("4",) and p.setting.anomalous == tuple(c for c in TEN if c != "4")
    assert p.setting.rows == {"4": tuple(range(20))}  # the one row is the whole test set
    sample = p.test[9]
    assert sample.label == 0 and sample.category == "4" and sample.has_mask is False and sample.mask.sum() == 0
    assert isinstance(p.train[0], torch.Tensor)  # images only: no label reaches fit


def test_multi_class_named_5v5_splits_and_rows():
    train, test = ten_classes(2), ten_classes(1)
    assert train_classes(multi_class(train, test, "5v5-even")) == ["0", "2", "4", "6", "8"]
    assert train_classes(multi_class(train, test, "5v5-last")) == ["5", "6", "7", "8", "9"]
    p = multi_class(train, test, "5v5-first")
    assert train_classes(p) == ["0", "1", "2", "3", "4"]
    anomalies = (5, 6, 7, 8, 9)
    assert p.setting.rows["2"] == (2, *anomalies)  # the class's normal images plus every anomaly
    assert train_classes(multi_class(train, test, ["1", "3"])) == ["1", "3"]


def test_defend_prototypes_follow_the_protocols_normal_classes():
    train, test = ten_classes(2), ten_classes(1)
    setting = multi_class(train, test, "5v5-odd").setting
    mkd = create_detector("mkd", weights="random", preset="cpu")
    assert tell_normal_count(mkd, setting, {})
    assert mkd.prepare().resolved_.n_prototypes == 10  # the paper's 2 x the normal classes
    told = create_detector("mkd", weights="random", preset="cpu", n_normal_classes=2)
    assert not tell_normal_count(told, setting, {"n_normal_classes": 2})  # the user's count wins
    assert told.prepare().resolved_.n_prototypes == 4
    assert not tell_normal_count(create_detector("padim", weights="random"), setting, {})  # no such parameter
    assert tell_normal_count(mkd, leave_one_out(train, test, "3").setting, {}) and mkd.n_normal_classes == 9


def test_leave_one_out_holds_out_one_class():
    train, test = ten_classes(1), ten_classes(1)
    p = leave_one_out(train, test, "7")
    assert train_classes(p) == [c for c in TEN if c != "7"]
    assert p.test.targets == [int(c == "7") for c in TEN] and p.setting.anomalous == ("7",)
    with pytest.raises(ValueError, match=r"unknown held-out class \['x'\]"):
        leave_one_out(train, test, "x")


def test_multi_object_normal_means_contains_a_normal_category():
    sets = [{"person", "car"}, {"person"}, {"dog"}, set(), {"car"}, {"person", "dog"}, {"person"}, {"person"}]
    data = labelled(sets, ["person", "car", "dog"])
    p = multi_object(data, "person", test_fraction=0.5, seed=3)
    train, test = set(p.train.indices), set(p.test.index)
    normal = {0, 1, 5, 6, 7}
    assert train <= normal and not train & test and len(train) + len(test & normal) == 5
    assert {2, 3, 4} <= test  # every image without a person, the unlabelled one included, is an anomaly
    assert [p.test.targets[k] for k, i in enumerate(p.test.index) if i in (2, 3, 4)] == [1, 1, 1]
    assert p.test[p.test.index.index(3)].category == "(no label)"
    again = multi_object(data, "person", test_fraction=0.5, seed=3)
    assert list(again.train.indices) == list(p.train.indices)  # seeded


def test_caps_are_per_class_seeded_and_keep_one_test_set():
    train, test = ten_classes(6), ten_classes(5)
    p = uni_class(train, test, "1", max_train_per_class=2, max_test_per_class=3, seed=1)
    assert len(p.train) == 2 and len(p.test) == 30
    counts = np.bincount([int(next(iter(test.labels[i]))) for i in p.test.index], minlength=10)
    assert counts.tolist() == [3] * 10
    other = build_protocol("leave-one-out", train, test, held_out="1", max_train_per_class=2, max_test_per_class=3,
                           seed=1)
    assert other.test.index == p.test.index  # the same test images whichever classes are normal
    assert p.setting.subsampling == {"max_train_per_class": 2, "max_test_per_class": 3, "seed": 1}


def test_build_protocol_refuses_incomplete_options():
    train, test = ten_classes(1), ten_classes(1)
    with pytest.raises(ValueError, match="exactly one normal class"):
        build_protocol("uni-class", train, test, normal=["1", "2"])
    with pytest.raises(ValueError, match="either normal classes .* or a named split"):
        build_protocol("multi-class", train, test)
    with pytest.raises(ValueError, match="needs both"):
        build_protocol("multi-class", train, test, normal=TEN)


class Brightness:
    """A stand-in detector: the score is the mean pixel (the hand images' index)."""

    batch_size = 4

    def score(self, images):
        return AnomalyScores(images.mean(dim=(1, 2, 3)), images.mean(dim=1))


def test_report_is_image_level_names_the_protocol_and_keeps_rows():
    train, test = ten_classes(1), ten_classes(2)
    p = multi_class(train, test, ["0", "1"])  # normal images are the darkest: a perfect ranking
    report = evaluate(Brightness(), p.test, progress=False)
    assert list(report.rows) == ["0", "1", "mean", "mixed"]
    assert all(not key.startswith("pixel_") or key == "pixel_gt" for row in report.rows.values() for key in row)
    assert report.rows["0"]["n_normal"] == 2 and report.rows["0"]["n_defective"] == 16
    assert report.rows["mean"]["n_normal"] == 4 and report.rows["mixed"]["n_defective"] == 16
    assert report.rows["mixed"]["image_auroc"] == 1.0
    markdown = report.to_markdown()
    assert "multi-class novelty" in markdown and "normal = {0, 1}" in markdown and "anomalous = {2, 3" in markdown
    header = next(line for line in markdown.splitlines() if "I-AUROC" in line)
    assert "P-AUROC" not in header and "AU-PRO" not in header and "pixel" not in markdown.lower()
    assert report.to_dict()["meta"]["setting"]["protocol"] == "multi-class"


TINY = ["--weights", "random", "--image-size", "32", "--device", "cpu", "--no-progress", "--batch-size", "8"]


def test_cli_runs_a_protocol_on_idx_files(tmp_path, capsys):
    root = tmp_path / "idx"
    write_idx(root, "train", tiny_images(18), np.repeat([0, 1, 2], 6))
    write_idx(root, "t10k", tiny_images(12, 1), np.repeat([0, 1, 2], 4))
    out = tmp_path / "run"
    args = ["--data-format", "idx", "--data", str(root), "--protocol", "uni-class", "--normal-classes", "1"]
    assert main(["run", "--method", "padim", "--n-features", "10", *TINY, *args, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    setting = report["meta"]["setting"]
    assert setting["protocol"] == "uni-class" and setting["normal"] == ["1"] and setting["anomalous"] == ["0", "2"]
    assert setting["n_train"] == 6 and report["meta"]["n_images"] == 12 and report["meta"]["n_normal"] == 4
    assert list(report["rows"]) == ["1", "mean", "mixed"] and "pixel_auroc" not in report["rows"]["mixed"]
    assert "uni-class novelty" in (out / "report.md").read_text()

    capsys.readouterr()
    assert main(["eval", "--model", str(out / "model"), *args, "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert again["rows"]["mixed"]["image_auroc"] == pytest.approx(report["rows"]["mixed"]["image_auroc"])

    assert main(["run", "--data-format", "idx", "--data", str(root), "--out", str(tmp_path / "x")]) == 2
    assert "--data-format idx needs --protocol" in capsys.readouterr().err
    assert main(["run", *args[:-1], "7", "--out", str(tmp_path / "x")]) == 2
    assert "unknown normal classes ['7']" in capsys.readouterr().err


def test_categories_without_any_masks_get_no_pixel_columns():
    from omniad.metrics import ScoredSet, report_from_scores

    scored = ScoredSet(np.array([0.1, 0.9, 0.2, 0.8]), np.array([0, 1, 0, 1]), ["a", "a", "b", "b"],
                       has_mask=np.zeros(4, bool))
    header = next(line for line in report_from_scores(scored).to_markdown().splitlines() if "I-AUROC" in line)
    assert "P-AUROC" not in header and "AU-PRO" not in header
