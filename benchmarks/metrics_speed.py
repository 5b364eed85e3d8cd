"""Micro-benchmark of the pixel metrics at protocol scale: N maps of SIZE x SIZE (default 1,000 x 256 x 256).

    python benchmarks/metrics_speed.py [--n 1000] [--size 256] [--sklearn]

Synthetic data: smooth random maps, a few blob defects per defective image (half the images), float32 maps as
evaluate() keeps them. Prints wall time and peak RSS of each step; --sklearn also times scikit-learn's
roc_auc_score / average_precision_score on the same pixels for comparison (slow, memory-hungry).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from omniad.metrics import aupro, auroc, pixel_metrics  # noqa: E402


def make_data(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    yy, xx = np.mgrid[:size, :size]
    for i in range(0, n, 2):
        for _ in range(int(rng.integers(1, 4))):
            cy, cx, r = rng.integers(0, size, 2).tolist() + [int(rng.integers(3, size // 10))]
            masks[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    maps = np.empty((n, size, size), dtype=np.float32)
    for i in range(n):  # one image at a time keeps the float64 temporaries small
        noise = ndimage.gaussian_filter(rng.normal(size=(size, size)), 4).astype(np.float32)
        maps[i] = noise * 10 + masks[i] * np.float32(rng.uniform(0.2, 1.5))
    return masks, maps


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(label: str, fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    print(f"{label:<36} {time.perf_counter() - start:7.2f} s   peak RSS {_rss_mb():7.0f} MB   -> {out}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--sklearn", action="store_true", help="also time scikit-learn on the same pixels")
    args = parser.parse_args()
    start = time.perf_counter()
    masks, maps = make_data(args.n, args.size)
    pixels = masks.size
    print(
        f"data: {args.n} maps of {args.size}x{args.size} = {pixels / 1e6:.1f} M pixels, "
        f"{masks.mean() * 100:.2f}% defect, made in {time.perf_counter() - start:.1f} s, "
        f"RSS {_rss_mb():.0f} MB"
    )
    timed("auroc (omniad)", auroc, masks, maps)
    timed("aupro (omniad)", aupro, masks, maps)
    timed("pixel_metrics: AUROC+AP+F1max+AUPRO", pixel_metrics, masks, maps)
    if args.sklearn:
        from sklearn.metrics import average_precision_score, roc_auc_score

        timed("roc_auc_score (scikit-learn)", roc_auc_score, masks.ravel(), maps.ravel())
        timed("average_precision_score (sklearn)", average_precision_score, masks.ravel(), maps.ravel())


if __name__ == "__main__":
    main()
