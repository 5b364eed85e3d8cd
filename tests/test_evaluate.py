"""evaluate() and Report: rows per category, mean, mixed; n/a pixel metrics; calibrated decisions; output."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from omniad.calibration import Calibration, threshold_at_far
from omniad.metrics import PROTOCOL, Report, ScoredSet, evaluate, report_from_scores
from omniad.metrics import result as result_module
from omniad.types import AnomalyScores, Sample

SIZE = 16


class _Backbone:
    name = "fake_backbone"
    weights_source = "fake weights (test)"


class ChannelDetector:
    """Scores what the images hold: map = channel 0, image score = max of the map. Knows no categories."""

    name = "channel"
    batch_size = 3
    image_size = SIZE
    seed = 7
    target_far = 0.25
    fit_seconds_ = 1.5
    device_ = torch.device("cpu")
    backbone = "fake_backbone"
    backbone_ = _Backbone()

    def __init__(self, threshold: float | None = None) -> None:
        self.calibration_ = None if threshold is None else Calibration(threshold, 0.25, np.array([threshold]), "test")
        self.calls = 0

    def get_params(self) -> dict:
        return {"pooling": "max"}

    def score(self, images: torch.Tensor) -> AnomalyScores:
        self.calls += 1
        maps = images[:, 0].clone()
        return AnomalyScores(maps.flatten(1).max(dim=1).values, maps)


def _sample(category: str, base: float, defect: float | None, has_mask: bool = True, seed: int = 0) -> Sample:
    """An image of constant value ``base`` (plus noise), with a square of value ``defect`` if defective."""
    gen = torch.Generator().manual_seed(seed)
    image = base + 0.01 * torch.rand(3, SIZE, SIZE, generator=gen)
    mask = torch.zeros(SIZE, SIZE)
    if defect is not None:
        mask[4:8, 5:10] = 1.0
        image[:, 4:8, 5:10] = defect
    label = int(defect is not None)
    if not has_mask:
        mask = torch.zeros(SIZE, SIZE)
    return Sample(
        image, mask, label, category, "good" if label == 0 else "spot", f"{category}/{seed}.png", has_mask
    )


def _dataset() -> list[Sample]:
    """Two categories, each perfectly separable, but B's normals score above A's defects; C has no masks."""
    samples = []
    for i in range(3):
        samples.append(_sample("A", 0.10, None, seed=i))
        samples.append(_sample("B", 0.50, None, seed=10 + i))
    for i in range(2):
        samples.append(_sample("A", 0.10, 0.30, seed=20 + i))
        samples.append(_sample("B", 0.50, 0.70, seed=30 + i))
    samples.append(_sample("C", 0.20, None, has_mask=False, seed=40))
    samples.append(_sample("C", 0.20, None, has_mask=False, seed=41))
    samples.append(_sample("C", 0.20, 0.90, has_mask=False, seed=42))
    return samples


def test_rows_per_category_mean_and_mixed():
    data = _dataset()
    report = evaluate(ChannelDetector(), data, progress=False)
    assert list(report.rows) == ["A", "B", "C", "mean", "mixed"]
    for name in ("A", "B"):
        row = report.rows[name]
        assert (
            row["image_auroc"] == 1.0
            and row["pixel_auroc"] == 1.0
            and row["pixel_aupro"] == pytest.approx(1.0)
        )
        assert (row["n_normal"], row["n_defective"]) == (3, 2)
    # One ranking for all: B's normal images outrank A's defects (the absolute-unified problem).
    labels = np.array([s.label for s in data])
    scores = np.array([float(s.image[0].max()) for s in data])
    mixed = report.rows["mixed"]
    assert mixed["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert mixed["image_auroc"] < 1.0 and mixed["pixel_auroc"] < 1.0
    assert (mixed["n_normal"], mixed["n_defective"]) == (8, 5)
    mean = report.rows["mean"]
    assert mean["image_auroc"] == pytest.approx(np.mean([report.rows[c]["image_auroc"] for c in "ABC"]))
    assert mean["pixel_ap"] == pytest.approx(np.mean([report.rows[c]["pixel_ap"] for c in "AB"]))
    # raw per-image data kept, in data order
    np.testing.assert_allclose(report.scores, scores, rtol=1e-6)
    assert report.labels.tolist() == labels.tolist() and report.categories == [s.category for s in data]


def test_category_without_masks_has_na_pixel_metrics_and_a_note():
    report = evaluate(ChannelDetector(), _dataset(), progress=False)
    row = report.rows["C"]
    assert row["pixel_gt"] is False
    assert all(math.isnan(row[k]) for k in ("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro"))
    assert row["image_auroc"] == 1.0
    assert any("C" in note and "n/a" in note for note in report.meta["notes"])
    c_line = next(line for line in report.to_markdown().splitlines() if line.startswith("| C |"))
    assert c_line.count("n/a") >= 4
    assert json.loads(report.to_json())["rows"]["C"]["pixel_auroc"] is None


def test_decisions_at_the_detectors_threshold():
    report = evaluate(ChannelDetector(threshold=0.4), _dataset(), progress=False)
    a, b, mixed = report.rows["A"], report.rows["B"], report.rows["mixed"]
    # A scores ~0.1 / 0.3: nothing flagged. B scores ~0.5 / 0.7: everything flagged.
    assert (a["recall"], a["false_alarm_rate"], a["miss_rate"]) == (0.0, 0.0, 1.0) and math.isnan(
        a["precision"]
    )
    assert (b["recall"], b["false_alarm_rate"], b["precision"]) == (1.0, 1.0, pytest.approx(0.4))
    assert report.meta["threshold"] == 0.4
    flagged = report.decisions()
    assert mixed["false_alarm_rate"] == pytest.approx(np.mean(flagged[report.labels == 0]))
    assert mixed["recall"] == pytest.approx(np.mean(flagged[report.labels == 1]))


def test_calibration_set_sets_the_threshold_from_normals_only():
    calibration = [_sample("A", v, None, seed=100 + i) for i, v in enumerate(np.linspace(0.05, 0.65, 8))]
    detector = ChannelDetector(threshold=0.95)
    report = evaluate(detector, _dataset(), calibration=calibration, target_far=0.25, progress=False)
    normal_scores = np.array([float(s.image[0].max()) for s in calibration])
    expected = threshold_at_far(normal_scores, 0.25)
    assert report.meta["threshold"] == pytest.approx(expected) and report.meta["target_far"] == 0.25
    assert np.mean(normal_scores > report.meta["threshold"]) <= 0.25
    assert "calibration set of 8" in report.meta["threshold_source"]
    assert report.rows["mixed"]["false_alarm_rate"] == pytest.approx(
        np.mean(report.scores[report.labels == 0] > expected)
    )


def test_no_threshold_gives_na_decisions():
    report = evaluate(ChannelDetector(), _dataset(), progress=False)
    assert math.isnan(report.rows["mixed"]["f1"]) and math.isnan(report.rows["A"]["recall"])


def test_meta_json_and_markdown_state_protocol_and_run_facts():
    report = evaluate(ChannelDetector(threshold=0.4), _dataset(), progress=False, batch_size=4)
    meta = report.meta
    assert meta["protocol"] == PROTOCOL and "AU-PRO" in PROTOCOL and "0.3" in PROTOCOL
    assert meta["detector"] == "channel" and meta["params"] == {"pooling": "max"}
    assert meta["backbone"] == "fake_backbone" and meta["weights_source"] == "fake weights (test)"
    assert (meta["image_size"], meta["seed"], meta["fit_seconds"]) == (SIZE, 7, 1.5)
    assert meta["map_size"] == [SIZE, SIZE] and meta["n_images"] == 13
    assert meta["score_seconds"] > 0 and meta["images_per_second"] > 0 and meta["peak_rss_mb"] > 0
    assert meta["torch_version"] == torch.__version__ and meta["device"] == "cpu"
    loaded = json.loads(report.to_json())
    assert loaded["meta"]["protocol"] == PROTOCOL and "images" not in loaded
    assert set(loaded["rows"]) == {"A", "B", "C", "mean", "mixed"}
    assert len(json.loads(report.to_json(include_scores=True))["images"]["scores"]) == 13
    md = report.to_markdown()
    assert PROTOCOL in md and "fake weights (test)" in md and "**mixed**" in md and "**mean**" in md
    a_line = next(line for line in md.splitlines() if line.startswith("| A |"))
    assert "| 100.0 |" in a_line


def test_save_writes_both_files_atomically(tmp_path, monkeypatch):
    report = evaluate(ChannelDetector(threshold=0.4), _dataset(), progress=False)
    folder = report.save(tmp_path / "out")
    first = (folder / "report.json").read_text()
    assert json.loads(first)["rows"]["A"]["image_auroc"] == 1.0
    assert (folder / "report.md").read_text() == report.to_markdown()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(result_module.os, "replace", broken_replace)
    changed = Report({"X": {}}, {"protocol": "other"})
    with pytest.raises(OSError):
        changed.save(folder)
    assert (folder / "report.json").read_text() == first  # the good report is still there, whole
    assert sorted(os.listdir(folder)) == ["report.json", "report.md"]  # no temporary files left behind


def test_bad_detector_output_gets_a_clear_error():
    class Downsampling(ChannelDetector):
        def score(self, images):
            maps = images[:, 0, ::2, ::2]
            return AnomalyScores(maps.flatten(1).max(dim=1).values, maps)

    with pytest.raises(ValueError, match="input resolution"):
        evaluate(Downsampling(), _dataset(), progress=False)
    with pytest.raises(ValueError, match="empty"):
        evaluate(ChannelDetector(), [], progress=False)


def test_batches_cover_every_image_once():
    detector = ChannelDetector()
    report = evaluate(detector, _dataset(), progress=False, batch_size=4)
    assert detector.calls == 4 and len(report.scores) == 13


def test_report_from_stored_scores_equals_evaluate():
    """Benchmarks pass stored scores, no detector: the report is the same as evaluate's."""
    detector = ChannelDetector(threshold=0.4)
    report = evaluate(detector, _dataset(), progress=False)
    samples = _dataset()
    masks = np.stack([s.mask.numpy() > 0.5 for s in samples])
    maps = np.stack([s.image[0].numpy() for s in samples]).astype(np.float32)
    scored = ScoredSet(maps.reshape(len(samples), -1).max(1), [s.label for s in samples],
                       [s.category for s in samples], maps, masks, np.array([s.has_mask for s in samples]))
    again = report_from_scores(scored, detector.calibration_)
    for row in report.rows:
        for key, value in report.rows[row].items():
            assert again.rows[row][key] == pytest.approx(value, nan_ok=True), (row, key)
    image_only = report_from_scores(ScoredSet(scored.scores, scored.labels, scored.categories), None)
    assert image_only.rows["mixed"]["image_auroc"] == report.rows["mixed"]["image_auroc"]
    assert math.isnan(image_only.rows["mixed"]["pixel_auroc"])
    with pytest.raises(ValueError, match="NaN or infinite"):
        ScoredSet([0.1, float("nan")], [0, 1], ["A", "A"])


def test_target_far_recalibrates_on_the_held_out_scores():
    detector = ChannelDetector()
    detector.calibration_ = Calibration.from_normal_scores(np.linspace(0, 1, 101), 0.01, "held out")
    report = evaluate(detector, _dataset(), target_far=0.2, progress=False)
    assert report.meta["threshold"] == pytest.approx(0.8) and report.meta["target_far"] == 0.2
