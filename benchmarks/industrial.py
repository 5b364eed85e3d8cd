"""Unified benchmark on the real two-type set (../shared/data/industrial): one model per method, trained on the
normal images of BOTH types at once, evaluated under the pinned protocol (per type, mean, mixed, calibrated F1).

    python benchmarks/industrial.py                                 # PatchCore and PaDiM
    python benchmarks/industrial.py --method patchcore --method uniad   # the issue-5 comparison, one run
    python benchmarks/industrial.py --method uniad --param epochs=40
    python benchmarks/industrial.py --method patchcore --param coreset_ratio=0.01 --out benchmarks/results

Methods with a CPU preset run it (CPU_SETTINGS); --param overrides. Prints each report (Markdown) with fit time,
test throughput and peak memory, and writes them under --out.
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import time
from pathlib import Path

import torch
from common import DEFAULT_DATA, parse_params

from omniad import create_detector
from omniad.data import MVTecDataset
from omniad.metrics import evaluate

# The CPU-friendly settings these runs use, stated in every report (the detectors' defaults stay the papers').
CPU_SETTINGS = {
    "patchcore": {"coreset_ratio": 0.01, "coreset": "greedy", "coreset_candidates": 100_000},
    "padim": {},
    "uniad": {"preset": "cpu"},
    "revdist": {"preset": "cpu"},
    "recontrast": {"preset": "cpu"},
    "pmad": {"preset": "cpu"},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="MVTec-style root")
    parser.add_argument("--method", action="append", help="detector(s) to run (default: patchcore and padim)")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="method parameter (YAML value), applied to every --method; repeatable")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--weights", default="offline", help="backbone weights (default: offline lite0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results", help="folder for the reports")
    args = parser.parse_args(argv)

    root = Path(args.data)
    if not root.is_dir():
        print(f"benchmark data not found at {root}", file=sys.stderr)
        return 2
    extra = parse_params(args.param)
    methods = args.method or ["patchcore", "padim"]
    train = MVTecDataset(root, split="train", image_size=args.image_size)
    test = MVTecDataset(root, split="test", image_size=args.image_size)
    print(f"# industrial benchmark: {', '.join(train.categories)}; {len(train)} train / {len(test)} test images; "
          f"{args.image_size}px; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}")
    for method in methods:
        params = {**CPU_SETTINGS.get(method, {}), **extra}
        detector = create_detector(method, weights=args.weights, image_size=args.image_size, seed=args.seed,
                                   **params)
        started = time.perf_counter()
        detector.fit(train)
        fit_seconds = time.perf_counter() - started
        report = evaluate(detector, test, progress=detector.progress)
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"\n## {method} {params}\nfit {fit_seconds:.1f} s; peak RSS {peak_gib:.2f} GiB (process so far)\n")
        print(report.to_markdown())
        report.save(Path(args.out) / f"industrial-{method}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
