"""omniad.predict: files, folders and tensors in; scores, decisions at the one calibrated threshold, overlays and
results out; the bad-input corpus (unreadable files, NaN scores, clashing names, no threshold) handled openly."""

from __future__ import annotations

import copy
import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import omniad
from omniad.data import MVTecDataset, read_image
from omniad.data.images import resize_image
from omniad.prediction import collect_inputs, overlay_names, predict
from omniad.report import overlay_scale
from omniad.types import AnomalyScores

SIZE = 64


@pytest.fixture(scope="module")
def detector(synthetic_root):
    """PaDiM fitted on the weave training images (random weights: fast), calibrated on its held-out share."""
    model = omniad.create_detector("padim", weights="random", image_size=SIZE, batch_size=8, device="cpu",
                                   progress=False, n_features=10)
    model.fit(MVTecDataset(synthetic_root, categories="weave", split="train", image_size=SIZE))
    assert model.calibration_ is not None
    return model


@pytest.fixture
def images(synthetic_root, tmp_path) -> Path:
    """A writable copy of the weave test images: good/*.png and one folder per defect type."""
    folder = tmp_path / "images"
    shutil.copytree(synthetic_root / "weave" / "test", folder)
    return folder


def _png(path: Path, size: int = 48, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)
    return path


def _own_scores(detector, paths) -> np.ndarray:
    batch = torch.stack([resize_image(read_image(p), SIZE) for p in paths])
    return detector.score(batch).image_scores.double().numpy()


def test_predict_folder_scores_decides_and_writes(detector, images, tmp_path):
    out = tmp_path / "out"
    result = omniad.predict(detector, images, out)

    files = sorted(images.rglob("*.png"))
    assert sorted(r.path for r in result.results) == sorted(str(p) for p in files)
    by_path = {r.path: r for r in result.results}
    own = _own_scores(detector, files)
    np.testing.assert_allclose([by_path[str(p)].score for p in files], own, rtol=1e-5, atol=1e-6)
    threshold = detector.calibration_.threshold
    assert result.threshold == threshold
    assert [by_path[str(p)].anomalous for p in files] == [bool(s > threshold) for s in own]
    assert result.n_flagged == int((own > threshold).sum()) and result.failed == []

    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["path"] for r in rows] == [r.path for r in result.results]
    assert all(r["anomalous"] == str(by_path[r["path"]].anomalous) and r["error"] == "" for r in rows)
    payload = json.loads((out / "results.json").read_text())
    assert payload["method"] == "padim" and payload["threshold"] == threshold
    assert payload["calibration"] == detector.calibration_.describe() == payload["threshold_source"]
    assert payload["failed"] == [] and payload["n_scored"] == len(files)
    assert all((out / r.overlay).is_file() for r in result.results)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left behind


def test_predict_tensors_write_nothing_without_out(detector, images, tmp_path, monkeypatch):
    files = sorted(images.rglob("*.png"))[:5]
    batch = torch.stack([read_image(p) for p in files])  # 64 px already; a list may mix sizes
    monkeypatch.chdir(tmp_path)
    result = predict(detector, batch)
    np.testing.assert_allclose(result.scores, _own_scores(detector, files), rtol=1e-5, atol=1e-6)
    assert [r.path for r in result.results] == [f"tensor:{i}" for i in range(5)]
    assert all(r.overlay is None for r in result.results) and list(tmp_path.iterdir()) == [tmp_path / "images"]

    mixed = predict(detector, [resize_image(batch[0], 100), str(files[1])])
    assert [r.path for r in mixed.results] == ["tensor:0", str(files[1])]  # the order given
    with pytest.raises(ValueError, match=r"tensor:0: .*\[0, 1\]"):
        predict(detector, batch * 255)


def test_nan_or_infinite_scores_are_an_error_naming_the_files(detector, tmp_path, monkeypatch):
    folder = tmp_path / "in"
    for name in ("a.png", "b.png", "c.png"):
        _png(folder / name, value=60)
    _png(folder / "white.png", value=255)
    _png(folder / "black.png", value=0)
    model = copy.deepcopy(detector)
    real_score = model.score

    def broken_score(batch):  # a broken model: NaN on white images, inf on black ones
        result = real_score(batch)
        means = batch.flatten(1).mean(1)
        scores = result.image_scores.clone()
        scores[means > 0.99] = float("nan")
        scores[means < 0.01] = float("inf")
        return AnomalyScores(scores, result.anomaly_maps)

    monkeypatch.setattr(model, "score", broken_score)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="NaN or infinite") as info:
        predict(model, folder, out)
    message = str(info.value)
    assert "white.png" in message and "black.png" in message and "a.png" not in message
    assert "2 of 5" in message
    assert not (out / "results.json").exists() and not (out / "overlays").exists()


def _corpus(folder: Path) -> dict[str, str]:
    """Good images plus one of each unreadable kind; returns bad file name -> expected words of its reason."""
    _png(folder / "good1.png")
    _png(folder / "sub" / "good2.png", value=90)
    data = (folder / "good1.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "text.png").write_text("this is not a png")
    os.symlink(folder / "nowhere.png", folder / "link.png")
    _png(folder / "bomb.png", size=200)  # over the limit the test sets
    _png(folder / "big.png", size=120)  # over MAX_IMAGE_PIXELS, under twice it: PIL only warns
    (folder / "notes.txt").write_text("not an image: skipped, not failed")
    return {"truncated.png": "truncated", "text.png": "not an image", "link.png": "broken symbolic link",
            "bomb.png": "too large", "big.png": "too large"}


def test_unreadable_files_are_listed_and_the_rest_scored(detector, tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # good images 48x48, big 120x120, bomb 200x200
    folder = tmp_path / "in"
    expected = _corpus(folder)
    out = tmp_path / "out"
    result = predict(detector, folder, out)

    assert sorted(Path(r.path).name for r in result.results) == ["good1.png", "good2.png"]
    reasons = {Path(f.path).name: f.reason for f in result.failed}
    assert set(reasons) == set(expected)
    for name, words in expected.items():
        assert words in reasons[name], (name, reasons[name])
    assert [Path(s.path).name for s in result.skipped] == ["notes.txt"]

    payload = json.loads((out / "results.json").read_text())
    assert {Path(f["path"]).name for f in payload["failed"]} == set(expected) and payload["n_failed"] == 5
    rows = list(csv.DictReader(open(out / "results.csv")))
    errors = {Path(r["path"]).name: r["error"] for r in rows if r["error"]}
    assert errors == reasons and all(r["score"] == "" for r in rows if r["error"])
    summary = result.summary()
    assert "5 input files could not be read" in summary
    assert all(f"{f.path}: {f.reason}" in summary for f in result.failed)


def test_no_readable_file_is_an_error_listing_them(detector, tmp_path):
    folder = tmp_path / "in"
    (folder / "x.png").parent.mkdir()
    (folder / "x.png").write_text("nope")
    (folder / "y.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match=r"none of the 2 input files could be read: .*x\.png: .*y\.jpg: .*empty"):
        predict(detector, folder, tmp_path / "out")
    assert not (tmp_path / "out" / "results.json").exists()


def test_overlay_files_never_overwrite_each_other(detector, tmp_path):
    folder = tmp_path / "in"
    _png(folder / "a.png", value=40)
    Image.fromarray(np.full((48, 48, 3), 200, np.uint8)).save(folder / "a.jpg")
    _png(folder / "sub" / "x.png", value=80)
    _png(folder / "sub_x.png", value=160)
    out = tmp_path / "out"
    result = predict(detector, folder, out)

    expected = {"overlays/a.jpg.png", "overlays/a.png.png", "overlays/sub/x.png.png", "overlays/sub_x.png.png"}
    assert {r.overlay for r in result.results} == expected
    written = {p.relative_to(out).as_posix() for p in (out / "overlays").rglob("*") if p.is_file()}
    assert written == expected
    pixels = {name: np.asarray(Image.open(out / name)).tobytes() for name in expected}
    assert len(set(pixels.values())) == 4  # four different pictures, none overwritten by another


def test_overlay_names_are_relative_to_the_common_folder():
    names = overlay_names([Path("/d/one/a.png"), Path("/d/two/a.png"), Path("/d/one/deeper/b.TIF")])
    assert names == ["overlays/one/a.png.png", "overlays/two/a.png.png", "overlays/one/deeper/b.TIF.png"]
    assert overlay_names([Path("/x/only.jpg")]) == ["overlays/only.jpg.png"]


def test_overlays_share_one_colour_scale_with_the_threshold(detector, images, tmp_path, monkeypatch):
    import omniad.prediction as prediction

    seen = []
    real = prediction.save_overlay

    def spy(*args, **kwargs):
        seen.append((kwargs["vmin"], kwargs["vmax"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(prediction, "save_overlay", spy)
    files = sorted(images.rglob("*.png"))
    predict(detector, images, tmp_path / "out", batch_size=3)  # several batches, one scale
    batch = torch.stack([resize_image(read_image(p), SIZE) for p in files])
    expected = overlay_scale(detector.score(batch).anomaly_maps, detector.calibration_.threshold)
    assert len(seen) == len(files) and len(set(seen)) == 1
    np.testing.assert_allclose(seen[0], expected, rtol=1e-5)


def test_overlay_scale_spans_the_maps_and_the_threshold():
    maps = torch.tensor([[[1.0, 2.0], [3.0, float("nan")]]])
    assert overlay_scale(maps) == (1.0, 3.0)
    assert overlay_scale(maps, threshold=5.0) == (1.0, 5.0)  # nothing reaches it: nothing drawn dark red
    assert overlay_scale(maps, threshold=0.5) == (0.5, 3.0)
    assert overlay_scale(maps, threshold=float("nan")) == (1.0, 3.0)
    assert overlay_scale([maps[:, :1], np.array([[7.0]])], 2.0) == (1.0, 7.0)  # batch by batch = all at once
    assert overlay_scale(torch.full((1, 2, 2), float("nan"))) == (0.0, 1.0)


def test_demo_overlays_use_the_same_scale(detector, synthetic_root, tmp_path):
    from omniad.demo import _write_overlays

    test = MVTecDataset(synthetic_root, categories="weave", split="test", image_size=SIZE)
    seen = []
    _write_overlays(detector, test, tmp_path, lambda image, amap, path, vmin, vmax: seen.append((vmin, vmax)))
    defective = [i for i, r in enumerate(test.samples) if r.label == 1]
    maps = detector.score(torch.stack([test[i].image for i in defective])).anomaly_maps
    assert len(seen) == len(defective) and len(set(seen)) == 1
    np.testing.assert_allclose(seen[0], overlay_scale(maps, detector.calibration_.threshold), rtol=1e-5)


def test_a_model_without_threshold_makes_no_decisions(detector, images, tmp_path):
    model = copy.deepcopy(detector)
    model.calibration_ = None
    out = tmp_path / "out"
    result = predict(model, images, out)
    assert result.threshold is None and result.n_flagged is None and result.decisions is None
    assert all(r.anomalous is None for r in result.results)
    assert "no calibrated threshold" in result.summary() and "flagged" not in result.summary()
    payload = json.loads((out / "results.json").read_text())
    assert payload["threshold"] is None and payload["n_flagged"] is None
    assert all(r["anomalous"] is None for r in payload["results"])
    assert all(r["anomalous"] == "" for r in csv.DictReader(open(out / "results.csv")))

    forced = predict(model, images, threshold=float(np.median(result.scores)))
    assert forced.n_flagged == int((result.scores > np.median(result.scores)).sum())
    assert "given by the user" in forced.summary()


def test_threshold_override_decides_and_says_so(detector, images):
    base = predict(detector, images)
    threshold = float(np.sort(base.scores)[2])  # the three lowest not flagged
    result = predict(detector, images, threshold=threshold)
    assert result.threshold == threshold and result.n_flagged == len(base.results) - 3
    assert result.calibration is detector.calibration_  # the model's own calibration is untouched
    assert detector.calibration_.threshold != threshold
    text = result.threshold_source
    assert "given by the user" in text and f"{detector.calibration_.threshold:.6g}" in text
    with pytest.raises(ValueError, match="finite"):
        predict(detector, images, threshold=float("nan"))


def test_the_output_folder_inside_an_input_folder_is_not_read_back(detector, images):
    out = images / "results"
    first = predict(detector, images, out)
    second = predict(detector, images, out)
    assert len(second.results) == len(first.results)
    assert [s.reason for s in second.skipped] == ["the output folder of this run"]


def test_collect_inputs_dedupes_and_refuses_missing_paths(images, tmp_path):
    files, skipped = collect_inputs([images, images / "good" / "000.png"])
    assert len(files) == len(list(images.rglob("*.png"))) and skipped == []
    with pytest.raises(FileNotFoundError, match="nothing.png: no such file"):
        collect_inputs([tmp_path / "nothing.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no image files"):
        collect_inputs([tmp_path / "empty"])


@pytest.mark.parametrize("readers", [1, 3])
def test_reader_threads_give_the_results_of_reading_inline(detector, tmp_path, monkeypatch, readers):
    """Reading ahead on threads keeps the order, the scores and the list of unreadable files."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    folder = tmp_path / "in"
    _corpus(folder)
    for i in range(11):  # several batches of 4, bad files among them
        _png(folder / f"more{i:02d}.png", value=20 * i)
    inline = predict(detector, folder, batch_size=4, readers=0)
    ahead = predict(detector, folder, batch_size=4, readers=readers)
    assert [r.path for r in ahead.results] == [r.path for r in inline.results]
    assert [r.score for r in ahead.results] == pytest.approx([r.score for r in inline.results], rel=1e-6)
    assert [(f.path, f.reason) for f in ahead.failed] == [(f.path, f.reason) for f in inline.failed]
    assert len(inline.results) == 13 and len(inline.failed) == 5


@pytest.mark.parametrize("bad", [dict(readers=-1), dict(batch_size=-2)])
def test_out_of_range_predict_settings_are_refused(detector, images, bad):
    with pytest.raises(ValueError, match="batch_size >= 1 and readers >= 0"):
        predict(detector, images, **bad)
