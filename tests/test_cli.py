"""The command line through its real entry point: fit -> eval -> predict on the tiny synthetic set."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from omniad.cli import build_parser, main

TINY = ["--weights", "random", "--image-size", "64", "--device", "cpu", "--no-progress", "--batch-size", "8"]


def _run(*args: str) -> subprocess.CompletedProcess:
    """Run the installed ``omniad`` console script (or ``python -m omniad.cli`` when not installed)."""
    exe = shutil.which("omniad")
    command = [exe] if exe else [sys.executable, "-m", "omniad.cli"]
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=600, env=env)


def test_fit_eval_predict_round_trip(synthetic_root, tmp_path):
    model = tmp_path / "model"
    fit = _run("fit", "--data", str(synthetic_root), "--method", "padim", "--n-features", "20", *TINY,
               "--out", str(model))
    assert fit.returncode == 0, fit.stderr
    config = json.loads((model / "config.json").read_text())
    assert config["method"] == "padim" and config["params"]["n_features"] == 20

    report_dir = tmp_path / "report"
    ev = _run("eval", "--model", str(model), "--data", str(synthetic_root), "--out", str(report_dir))
    assert ev.returncode == 0, ev.stderr
    report = json.loads((report_dir / "report.json").read_text())
    assert "mixed" in json.dumps(report) and "weave" in json.dumps(report)

    out = tmp_path / "pred"
    images = synthetic_root / "weave" / "test"
    pred = _run("predict", "--model", str(model), str(images), "--out", str(out))
    assert pred.returncode == 0, pred.stderr
    rows = list(csv.DictReader(open(out / "results.csv")))
    n_images = len(list(images.rglob("*.png")))
    assert len(rows) == n_images
    assert len(list((out / "overlays").rglob("*.png.png"))) == n_images  # overlays/<type>/<name>.png.png
    payload = json.loads((out / "results.json").read_text())
    assert payload["threshold"] == pytest.approx(config["meta"]["calibration"]["threshold"])
    assert all((float(r["score"]) > payload["threshold"]) == (r["anomalous"] == "True") for r in rows)
    flagged = sum(r["anomalous"] == "True" for r in rows)
    assert f"{flagged} flagged anomalous at threshold" in pred.stdout


def test_method_options_come_from_the_detector(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--method", "patchcore", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--coreset-ratio" in text and "memory bank" in text and "--image-size" in text


def test_errors_are_one_line_not_tracebacks(tmp_path, capsys):
    assert main(["fit", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "omniad: error:" in err and "missing" in err and "Traceback" not in err

    assert main(["fit", "--method", "nope", "--data", str(tmp_path), "--out", str(tmp_path / "m")]) == 2
    assert "known detectors" in capsys.readouterr().err

    assert main(["eval", "--model", str(tmp_path / "nomodel"), "--data", str(tmp_path)]) == 2
    assert "nomodel" in capsys.readouterr().err


def test_predict_names_a_broken_image(synthetic_root, tmp_path, capsys):
    model = tmp_path / "model"
    assert main(["fit", "--data", str(synthetic_root), "--method", "padim", "--n-features", "10", *TINY,
                 "--train-categories", "weave", "--out", str(model)]) == 0
    broken = tmp_path / "inputs" / "broken.png"
    broken.parent.mkdir()
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    capsys.readouterr()
    assert main(["predict", "--model", str(model), str(broken.parent), "--out", str(tmp_path / "p")]) == 2
    assert "broken.png" in capsys.readouterr().err


def test_list_shows_every_detector(capsys):
    from omniad import list_detectors

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in list_detectors())


def test_parse_value_reads_yaml_and_every_spelling_of_a_number():
    from omniad.cli import parse_value

    assert parse_value("1e-4") == 1e-4 and parse_value("-5E3") == -5000.0 and parse_value("2") == 2
    assert parse_value("[1, 2]") == [1, 2] and parse_value("false") is False and parse_value("null") is None
    assert parse_value("zero") == "zero" and parse_value("1e-4x") == "1e-4x" and parse_value("inf") == "inf"


# ------------------------------------------------------------------ predict and fit on bad input
@pytest.fixture(scope="module")
def models(synthetic_root, tmp_path_factory) -> dict[str, Path]:
    """Two tiny saved PaDiM models of the weave images: calibrated, and without calibration."""
    folder = tmp_path_factory.mktemp("models")
    paths = {"calibrated": folder / "calibrated", "uncalibrated": folder / "uncalibrated"}
    for name, extra in (("calibrated", []), ("uncalibrated", ["--calibration-fraction", "0"])):
        code = main(["fit", "--data", str(synthetic_root), "--method", "padim", "--n-features", "10", *TINY,
                     "--train-categories", "weave", *extra, "--out", str(paths[name])])
        assert code == 0
    return paths


def _bad_folder(folder: Path, synthetic_root: Path) -> dict[str, str]:
    """Two good images and one of each unreadable kind; bad name -> words of its reason."""
    good = sorted((synthetic_root / "weave" / "test" / "good").glob("*.png"))[:2]
    folder.mkdir(parents=True)
    for path in good:
        shutil.copy(path, folder / path.name)
    data = good[0].read_bytes()
    (folder / "cut.png").write_bytes(data[: len(data) // 2])
    (folder / "words.png").write_text("a text file with an image's name")
    os.symlink(folder / "absent.png", folder / "dangling.png")
    return {"cut.png": "truncated", "words.png": "not an image", "dangling.png": "broken symbolic link"}


def test_predict_lists_unreadable_files_and_exits_1(models, synthetic_root, tmp_path, capsys):
    folder = tmp_path / "in"
    bad = _bad_folder(folder, synthetic_root)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["predict", "--model", str(models["calibrated"]), str(folder), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "2 images scored" in captured.out and "3 input files could not be read" in captured.out
    for name, words in bad.items():
        line = next(line for line in captured.out.splitlines() if name in line)
        assert words in line, line
    assert "3 of 5 input files could not be read" in captured.err and "Traceback" not in captured.err
    payload = json.loads((out / "results.json").read_text())
    assert {Path(f["path"]).name for f in payload["failed"]} == set(bad) and payload["n_scored"] == 2


def test_predict_without_threshold_says_so_and_threshold_overrides(models, synthetic_root, tmp_path, capsys):
    images = synthetic_root / "weave" / "test"
    capsys.readouterr()
    assert main(["predict", "--model", str(models["uncalibrated"]), str(images), "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "no calibrated threshold" in out and "--threshold" in out and "flagged" not in out
    assert json.loads((tmp_path / "a" / "results.json").read_text())["threshold"] is None

    scores = sorted(r["score"] for r in json.loads((tmp_path / "a" / "results.json").read_text())["results"])
    threshold = (scores[2] + scores[3]) / 2  # the three lowest stay below it
    for model in ("uncalibrated", "calibrated"):
        assert main(["predict", "--model", str(models[model]), str(images), "--out", str(tmp_path / model),
                     "--threshold", repr(threshold), "--no-overlays"]) == 0
        out = capsys.readouterr().out
        payload = json.loads((tmp_path / model / "results.json").read_text())
        flagged = sum(r["score"] > threshold for r in payload["results"])  # each model its own scores
        assert f"{flagged} flagged anomalous at threshold {threshold:.6g} given by the user" in out
        assert payload["threshold"] == threshold and payload["n_flagged"] == flagged
        assert [r["anomalous"] for r in payload["results"]] == [r["score"] > threshold for r in payload["results"]]
        assert not (tmp_path / model / "overlays").exists()
        if model == "uncalibrated":
            assert flagged == len(scores) - 3
    assert "overriding the model's calibrated" in out  # the calibrated model's run


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_predict_on_cuda_without_cuda_is_a_one_line_error(models, synthetic_root, tmp_path, capsys):
    image = synthetic_root / "weave" / "test" / "good" / "000.png"
    capsys.readouterr()
    code = main(["predict", "--model", str(models["calibrated"]), "--device", "cuda", str(image),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "omniad: error:" in err and "device 'cuda' was asked for, but this machine has no CUDA device" in err
    assert len([line for line in err.splitlines() if line.startswith("omniad")]) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_fit_reports_the_files_it_cannot_use(synthetic_root, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root / "weave", root / "weave")
    good = root / "weave" / "train" / "good"
    (good / "extra").mkdir()
    shutil.copy(good / "000.png", good / "extra" / "000.png")
    os.symlink(tmp_path / "gone.png", good / "link.png")
    (good / "notes.txt").write_text("x")
    capsys.readouterr()
    assert main(["fit", "--data", str(root), "--method", "padim", "--n-features", "10", *TINY,
                 "--out", str(tmp_path / "m")]) == 0
    err = capsys.readouterr().err
    assert "3 entries of the train folders are not used" in err
    assert f"{good / 'extra'}: sub-folder" in err and f"{good / 'link.png'}: broken symbolic link" in err
    assert f"{good / 'notes.txt'}: not an image file name" in err
    assert f"on {len(list(good.glob('[0-9]*.png')))} normal images" in err
    assert "calibrated threshold" in err and "set on" in err
    assert "held-out normals flagged, per cluster of the training images: #" in err  # each cluster's rate


def test_fit_without_calibration_says_so(synthetic_root, tmp_path, capsys):
    assert main(["fit", "--data", str(synthetic_root), "--method", "padim", "--n-features", "10", *TINY,
                 "--train-categories", "weave", "--calibration-fraction", "0", "--out", str(tmp_path / "m")]) == 0
    err = capsys.readouterr().err
    assert "no calibrated threshold" in err and "nan" not in err


def test_fit_without_a_method_fits_the_default_recipe_and_options_win(synthetic_root, tmp_path, capsys):
    from omniad import load_detector
    from omniad.cli import DEFAULT_RECIPE

    assert main(["fit", "--data", str(synthetic_root), *TINY, "--train-categories", "weave,granite",
                 "--iterations", "20", "--out", str(tmp_path / "m")]) == 0
    assert "method: cada over padim (the default" in capsys.readouterr().err
    params = load_detector(tmp_path / "m").get_params()
    assert (params["base"], params["iterations"]) == (DEFAULT_RECIPE["base"], 20)  # the recipe, then the options
    parser, _ = build_parser("fit", "cada")
    explicit = parser.parse_args(["fit", "--data", "x", "--method", "cada", "--out", "y"])
    assert explicit.method == "cada" and explicit.base is None  # --method cada: the paper's base, no recipe
