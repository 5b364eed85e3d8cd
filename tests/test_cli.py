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

from omniad.cli import main

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
    assert len(list((out / "overlays").glob("*.png"))) == n_images
    payload = json.loads((out / "results.json").read_text())
    assert payload["threshold"] == pytest.approx(config["meta"]["threshold"])
    assert all((float(r["score"]) > payload["threshold"]) == (r["anomalous"] == "True") for r in rows)


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
