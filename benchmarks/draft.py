"""What draft decoding (``read_image(..., draft=True)``: a JPEG at least twice the model's size decoded at 1/2, 1/4
or 1/8 scale by libjpeg, then resized as always) changes against full decoding, per real type and image size.

Two pipelines per type and size, PaDiM (offline ImageNet weights, batch 16, seed 0) on a seeded sample of the
training images: one reading every image with full decoding (fit and test), one with draft decoding (fit and
test); each evaluated on the whole test split with ``omniad.evaluate`` and decided at its own calibrated threshold.
A third run scores the drafted test images with the model fitted on full decodes: the test-time change alone (what
a model trained before draft decoding meets). Also: the share of test files that are drafted at all (a JPEG at
least twice the size on both sides), ``read_image`` time per test image both ways, the mean pixel difference of
the drafted ones, and the model's own scoring time per image for scale.

    python benchmarks/draft.py --out benchmarks/results/draft.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from common import DEFAULT_DATA, publish
from tiling import subsample

import omniad
from omniad.data import MVTecDataset, read_image
from omniad.data.images import DRAFT_MIN_FACTOR, _size_hw, read_image_hw


def drafted(path: Path, size: int) -> bool:
    """Whether ``read_image(path, size)`` decodes at a reduced scale: a JPEG at least twice the size."""
    if path.suffix.lower() not in (".jpg", ".jpeg"):
        return False
    (height, width), (th, tw) = read_image_hw(path), _size_hw(size)
    return height >= DRAFT_MIN_FACTOR * th and width >= DRAFT_MIN_FACTOR * tw


def read_ms(paths: list[Path], size: int, draft: bool, rounds: int) -> float:
    """Best of ``rounds`` passes: milliseconds per ``read_image`` (file bytes in the page cache)."""
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for path in paths:
            read_image(path, size, draft=draft)
        best = min(best, time.perf_counter() - started)
    return 1000 * best / len(paths)


def fitted(category: str, args: argparse.Namespace, size: int, draft: bool):
    detector = omniad.create_detector("padim", weights="offline", image_size=size, batch_size=16, progress=False,
                                      seed=0, device="cpu")
    train = MVTecDataset(args.data, categories=[category], split="train", image_size=size, draft=draft)
    split = detector.split_calibration

    def recorded(images):  # which training images calibrate: clustered on features of the images as read
        out = split(images)
        detector.held_out = set() if out[1] is None else set(out[1].indices)
        return out

    detector.split_calibration = recorded
    started = time.perf_counter()
    detector.fit(subsample(train, args.max_train, args.seed))
    return detector, time.perf_counter() - started


def compare(full, other) -> tuple[float, int]:
    """Largest image-score change relative to the largest full score; test images whose decision differs."""
    change = float(np.abs(other.scores - full.scores).max() / np.abs(full.scores).max())
    return change, int((other.decisions() != full.decisions()).sum())


def run(category: str, size: int, args: argparse.Namespace) -> dict:
    test_full = MVTecDataset(args.data, categories=[category], split="test", image_size=size, draft=False)
    test_draft = MVTecDataset(args.data, categories=[category], split="test", image_size=size, draft=True)
    paths = [r.path for r in test_full.samples]
    which = [p for p in paths if drafted(p, size)]
    read_image(paths[0], size)  # warm-up
    full_ms, draft_ms = read_ms(paths, size, False, args.rounds), read_ms(paths, size, True, args.rounds)
    pixel = [float((read_image(p, size) - read_image(p, size, draft=False)).abs().mean()) * 255 for p in which]

    model_full, fit_full = fitted(category, args, size, draft=False)
    model_draft, fit_draft = fitted(category, args, size, draft=True)
    full = omniad.evaluate(model_full, test_full, progress=False)
    own = omniad.evaluate(model_draft, test_draft, progress=False)
    mixed = omniad.evaluate(model_full, test_draft, progress=False)  # full-decode model, drafted test images
    batch = torch.stack([test_full[i].image for i in range(min(64, len(test_full)))])
    model_full.score(batch[:16])  # warm-up
    started = time.perf_counter()
    for start in range(0, len(batch), 16):
        model_full.score(batch[start:start + 16])
    model_ms = 1000 * (time.perf_counter() - started) / len(batch)

    thresholds = (model_full.calibration_.threshold, model_draft.calibration_.threshold)
    change, flipped = compare(full, own)
    test_change, test_flipped = compare(full, mixed)
    return {
        "type": category, "size": size, "n_test": len(paths), "n_drafted": len(which),
        "full_ms": full_ms, "draft_ms": draft_ms, "model_ms": model_ms,
        "pixel": max(pixel) if pixel else 0.0, "pixel_mean": float(np.mean(pixel)) if pixel else 0.0,
        "auroc_full": full.rows[category]["image_auroc"], "auroc_draft": own.rows[category]["image_auroc"],
        "auroc_test": mixed.rows[category]["image_auroc"],
        "change": change, "flipped": flipped, "test_change": test_change, "test_flipped": test_flipped,
        "fit_s": fit_full + fit_draft,
        "threshold_full": float(thresholds[0]), "threshold_draft": float(thresholds[1]),
        "n_calibration": int(model_full.calibration_.normal_scores.size),
        "held_out_differ": len(model_full.held_out - model_draft.held_out),
        "flagged": [int(r.decisions().sum()) for r in (full, own, mixed)],
    }


def table(rows: list[dict], args: argparse.Namespace) -> list[str]:
    lines = [
        "# Draft decoding against full decoding (benchmarks/draft.py)",
        "",
        f"PaDiM (tf_efficientnet_lite0, offline ImageNet weights, batch 16, seed 0), fitted on {args.max_train} "
        f"training images per type (seeded sample, seed {args.seed}), evaluated on every test image of "
        f"{args.data}; CPU, {torch.get_num_threads()} torch thread(s).",
        "Pipelines: *full* reads fit and test images with full decoding, *draft* with draft decoding (each decided "
        "at its own calibrated threshold); *test only* scores the drafted test images with the full-decode model.",
        "Score change: the largest |draft - full| image score over the largest full score. Flips: test images whose "
        "decision differs from the full pipeline's. Pixel: mean |draft - full| x 255 of a drafted image (mean / "
        "largest over the drafted files). Read: ``read_image`` ms per test image (best of "
        f"{args.rounds} passes, files in the page cache); model: PaDiM's ``score`` ms per image.",
        "",
        "| type | size | drafted | read full ms | read draft ms | model ms | pixel x255 mean / max | AUROC full "
        "| AUROC draft | score change | flips | AUROC test only | score change test only | flips test only |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    thresholds = [
        "",
        "Thresholds (each pipeline's own, calibrated on the held-out normal training images) and test images flagged:",
        "",
        "| type | size | held-out normals | of them not held out by the draft pipeline | threshold full "
        "| threshold draft | flagged full | flagged draft | flagged test only |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['type']} | {r['size']} | {r['n_drafted']}/{r['n_test']} ({100 * r['n_drafted'] / r['n_test']:.0f}%) "
            f"| {r['full_ms']:.2f} | {r['draft_ms']:.2f} | {r['model_ms']:.1f} "
            f"| {r['pixel_mean']:.2f} / {r['pixel']:.2f} "
            f"| {100 * r['auroc_full']:.2f} | {100 * r['auroc_draft']:.2f} | {100 * r['change']:.2f}% "
            f"| {r['flipped']}/{r['n_test']} | {100 * r['auroc_test']:.2f} | {100 * r['test_change']:.2f}% "
            f"| {r['test_flipped']}/{r['n_test']} |"
        )
        thresholds.append(
            f"| {r['type']} | {r['size']} | {r['n_calibration']} | {r['held_out_differ']} | {r['threshold_full']:.4g} "
            f"| {r['threshold_draft']:.4g} | {' | '.join(str(n) for n in r['flagged'])} |"
        )
    return lines + thresholds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--categories", nargs="+", default=["kolektor", "magnetic_tile"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[128, 256])
    parser.add_argument("--max-train", type=int, default=100, help="training images per type (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training sample")
    parser.add_argument("--rounds", type=int, default=2, help="timing passes over the test files (best kept)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a small shared CPU more threads fight and make the timings noise)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows = []
    for category in args.categories:
        for size in args.sizes:
            rows.append(run(category, size, args))
            print(rows[-1], flush=True)
    lines = table(rows, args)
    lines += ["", f"Whole run: {time.perf_counter() - started:.0f} s."]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
