"""Scoring speed of the torch model vs its ONNX (onnxruntime) and OpenVINO exports, on the same images.

    python benchmarks/export_speed.py [--methods padim patchcore] [--size 256] [--batch 16] [--threads N]

Fits each method on the tiny synthetic set (3 types x 8 training images, written at --size), exports it to ONNX and
OpenVINO, then scores the 24 test images once per runtime, --batch images per ``score`` call, after one warm-up
call: images/s, and the largest relative difference to the torch scores (``omniad.export.parity``). Reports the
machine (nproc, load average before and after) with the numbers: the machine may be shared.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from omniad import create_detector  # noqa: E402
from omniad.data import MVTecDataset  # noqa: E402
from omniad.data.synthetic import make_synthetic_dataset  # noqa: E402
from omniad.export import ExportedDetector, export_detector, parity  # noqa: E402


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f}"


def time_scoring(model, images: torch.Tensor, batch: int) -> tuple[float, object]:
    """One warm-up call, then one timed pass over ``images`` in calls of ``batch``: (images/s, scores)."""
    model.score(images[:batch])
    started = time.perf_counter()
    parts = [model.score(images[i : i + batch]) for i in range(0, len(images), batch)]
    seconds = time.perf_counter() - started
    scores = torch.cat([p.image_scores for p in parts]), torch.cat([p.anomaly_maps for p in parts])
    return len(images) / seconds, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["padim", "patchcore"])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--weights", default="offline")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    formats = ["onnx"] + (["openvino"] if importlib.util.find_spec("openvino") else [])
    print(f"nproc {os.cpu_count()}, torch threads {torch.get_num_threads()}, {load()} (before)")
    with tempfile.TemporaryDirectory() as tmp:
        root = make_synthetic_dataset(Path(tmp) / "data", categories=["weave", "granite", "washer"], n_train=8,
                                      n_test_good=4, n_test_defect=4, image_size=args.size, seed=0)
        train = MVTecDataset(root, split="train", image_size=args.size)
        test = MVTecDataset(root, split="test", image_size=args.size)
        images = torch.stack([test[i].image for i in range(len(test))])
        print(f"{len(train)} training, {len(images)} test images of {args.size} px; batch {args.batch}\n")
        print("| method | runtime | images/s | graph runs of | max relative difference to torch |")
        print("|---|---|---|---|---|")
        for method in args.methods:
            detector = create_detector(method, weights=args.weights, image_size=args.size, device="cpu",
                                       batch_size=args.batch, progress=False, seed=0).fit(train)
            rate, (scores, maps) = time_scoring(detector, images, args.batch)
            print(f"| {method} | torch | {rate:.1f} | {args.batch} | - |", flush=True)
            for kind in formats:
                path = Path(tmp) / f"{method}.{'onnx' if kind == 'onnx' else 'xml'}"
                export_detector(detector, path, format=kind)
                model = ExportedDetector.load(path)
                model_rate, (s, m) = time_scoring(model, images, args.batch)
                worst = parity(scores.numpy(), s.numpy(), maps.numpy(), m.numpy())
                runtime = "onnxruntime" if kind == "onnx" else "OpenVINO"
                print(f"| {method} | {runtime} | {model_rate:.1f} | {model.batch_size} | {worst:.2g} |", flush=True)
    print(f"\n{load()} (after)")


if __name__ == "__main__":
    main()
