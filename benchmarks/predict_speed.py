"""From image files on disk to decisions: ``omniad.predict`` throughput per model and path, in one run.

Fits PaDiM and PatchCore (1% coreset, the peer comparison's setting) on one type's training images, exports each
to ONNX (and OpenVINO when installed), then times ``omniad.predict`` on that type's test files: torch reading on
the calling thread (the default on a CPU), torch with one reader thread, onnxruntime and OpenVINO reading
inline. Every path must give the same decisions as torch. One warm-up pass per path, then the timed one.

    python benchmarks/predict_speed.py --category kolektor --out benchmarks/results/predict-speed.md
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import time

import numpy as np
import torch
from common import DEFAULT_DATA, publish

from omniad import create_detector, predict
from omniad.data import MVTecDataset
from omniad.export import load_model


def _load() -> str:
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())


def time_predict(model, files: list[str], readers: int | None) -> tuple[float, np.ndarray]:
    predict(model, files[: model.batch_size], readers=readers, progress=False)  # warm-up
    started = time.perf_counter()
    result = predict(model, files, readers=readers, progress=False)
    seconds = time.perf_counter() - started
    return len(files) / seconds, result.decisions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--category", default="kolektor")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--methods", nargs="+", default=["padim", "patchcore"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    train = MVTecDataset(args.data, categories=[args.category], split="train", image_size=args.image_size)
    test = MVTecDataset(args.data, categories=[args.category], split="test", image_size=args.image_size)
    files = [str(record.path) for record in test.samples]  # the files on disk, not decoded here
    params = {"padim": {}, "patchcore": {"coreset_ratio": 0.01}}
    rows = []
    load_before = _load()
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            detector = create_detector(method, weights="offline", image_size=args.image_size,
                                       batch_size=args.batch_size, progress=False, **params[method]).fit(train)
            detector.save(f"{tmp}/{method}")
            paths = {"torch (reading inline, the CPU default)": (f"{tmp}/{method}", 0),
                     "torch, 1 reader thread": (f"{tmp}/{method}", 1)}
            detector.export(f"{tmp}/{method}.onnx", format="onnx")
            paths["onnxruntime"] = (f"{tmp}/{method}.onnx", 0)
            if importlib.util.find_spec("openvino") is not None:
                detector.export(f"{tmp}/{method}.xml", format="openvino")
                paths["OpenVINO"] = (f"{tmp}/{method}.xml", 0)
            reference = None
            for name, (path, readers) in paths.items():
                started = time.perf_counter()
                model = load_model(path)
                load_seconds = time.perf_counter() - started
                rate, decisions = time_predict(model, files, readers)
                reference = decisions if reference is None else reference
                same = int((decisions == reference).sum())
                rows.append((method, name, rate, load_seconds, f"{same}/{len(files)}"))
                print(rows[-1], flush=True)
    lines = [
        f"# omniad predict, files to decisions ({args.category}: {len(files)} test files)",
        "",
        f"tf_efficientnet_lite0 offline weights, {args.image_size} px, batch {args.batch_size}; {os.cpu_count()} "
        f"CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads; load average before "
        f"{load_before}, after {_load()}.",
        "",
        "| method | path | images/s | model load s | decisions equal to torch inline |",
        "|---|---|---:|---:|---:|",
    ] + [f"| {m} | {p} | {r:.1f} | {s:.2f} | {d} |" for m, p, r, s, d in rows]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
