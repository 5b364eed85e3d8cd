"""omniad against the peer (anomalib) in one run, same machine and data: fit time, predict throughput from image
files on disk to decisions, image AUROC and AU-PRO per type, for PaDiM and PatchCore (1% coreset).

omniad side: the method fitted per type (as the peer's per-type models), `omniad.predict` on the type's test files
with the torch model and with its ONNX export (onnxruntime), and `evaluate` for the metrics. Peer side:
``benchmarks/peer_anomalib.py`` run by ``--peer-python`` (a venv where ``pip install anomalib`` was run), with
omniad's offline weights for the same backbone. Both sides: tf_efficientnet_lite0, 256 px, batch 16.

    python benchmarks/speed.py --categories kolektor --peer-python /tmp/peer/bin/python \\
        --out benchmarks/results/speed.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import DEFAULT_DATA, publish

from omniad import create_detector, evaluate, predict
from omniad.data import MVTecDataset
from omniad.export import load_model
from omniad.weights import offline_cache_path

SETTINGS = {  # (method, label) -> parameters; PatchCore also with the measured better image score
    ("padim", "PaDiM"): {},
    ("patchcore", "PatchCore, paper's score"): {"coreset_ratio": 0.01},
    ("patchcore", "PatchCore, top-1% score"): {"coreset_ratio": 0.01, "image_pooling": "top1"},
}


def omniad_rows(category: str, args: argparse.Namespace, tmp: str) -> list[dict]:
    train = MVTecDataset(args.data, categories=[category], split="train", image_size=256)
    test = MVTecDataset(args.data, categories=[category], split="test", image_size=256)
    files = [str(r.path) for r in test.samples]
    rows = []
    for (method, label), params in SETTINGS.items():
        started = time.perf_counter()
        detector = create_detector(method, weights="offline", image_size=256, batch_size=16, progress=False,
                                   **params).fit(train)
        fit_seconds = time.perf_counter() - started
        report = evaluate(detector, test, progress=False)
        detector.export(f"{tmp}/{method}.onnx", format="onnx")
        for path, model in (("torch", detector), ("onnxruntime", load_model(f"{tmp}/{method}.onnx"))):
            predict(model, files[:16], progress=False)  # warm-up
            started = time.perf_counter()
            predict(model, files, progress=False)
            seconds = time.perf_counter() - started
            rows.append({"tool": "omniad", "setting": label, "path": path, "category": category,
                         "fit_seconds": fit_seconds, "images_per_second": len(files) / seconds,
                         "image_auroc": report.rows[category]["image_auroc"],
                         "aupro": report.rows[category]["pixel_aupro"]})
            print(rows[-1], flush=True)
    return rows


def peer_rows(category: str, args: argparse.Namespace) -> list[dict]:
    rows = []
    for method, label in (("padim", "PaDiM"), ("patchcore", "PatchCore, paper's score")):
        out = subprocess.run(
            [args.peer_python, str(Path(__file__).with_name("peer_anomalib.py")), "--data", args.data,
             "--category", category, "--method", method, "--weights", str(offline_cache_path("tf_efficientnet_lite0"))],
            capture_output=True, text=True, check=False, timeout=7200)
        if out.returncode != 0:
            raise SystemExit(f"the peer failed on {category} {method}:\n{out.stderr[-3000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"tool": "anomalib", "setting": label, "path": "engine.predict(data_path)", **result})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--categories", nargs="+", default=["kolektor"])
    parser.add_argument("--peer-python", help="python of an environment with anomalib (the peer is skipped without)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    load_before = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for category in args.categories:
            rows += omniad_rows(category, args, tmp)
            if args.peer_python:
                rows += peer_rows(category, args)
    load_after = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    lines = [
        "# omniad vs anomalib: one run, same machine, same data, per type",
        "",
        f"tf_efficientnet_lite0 with omniad's offline ImageNet weights on both sides, 256 px, batch 16, PaDiM (stages "
        f"1-3, 100 features) and PatchCore (stages 2-3, 1% coreset). {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, python {sys.version.split()[0]}; load average "
        f"before {load_before}, after {load_after}. Predict = from image files on disk to decisions (omniad: "
        "`omniad.predict`, what `omniad predict` runs; anomalib: `Engine.predict(data_path=...)`), one warm-up "
        "pass for omniad. omniad holds 10% of the training images out for its threshold; anomalib trains on all.",
        "",
        "| type | tool | setting | predict path | fit s | predict img/s | image AUROC | AU-PRO |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['category']} | {r['tool']} | {r['setting']} | {r['path']} | {r['fit_seconds']:.1f} | "
                     f"{r['images_per_second']:.1f} | {100 * r['image_auroc']:.1f} | {100 * r['aupro']:.1f} |")
    publish(lines, args.out)


if __name__ == "__main__":
    main()
