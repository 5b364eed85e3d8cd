"""Why tiling at native resolution lowers the mixed image AUROC while it doubles the AU-PRO: the image score
pooled several ways (max, mean of the top 1%, mean) from the same maps, squashed 256 px and tiled, for a method
with per-position statistics (PaDiM: one Gaussian per feature-map position) and a position-free one (PatchCore:
one memory bank for every position). If the loss came from max-pooling a larger map, other poolings would recover
it; if it came from tiles of every part of every image sharing PaDiM's per-position statistics, PatchCore would
not lose it.

    python benchmarks/tiling_pooling.py padim
    python benchmarks/tiling_pooling.py patchcore \\
        '{"coreset_ratio": 0.01, "max_bank_size": 4000, "coreset": "greedy", "coreset_candidates": 200000}'

One unified model for both types of ../shared/data/industrial, 100 training images per type (the seeded subsample
of benchmarks/tiling.py), every test image; prints one JSON line per setting and writes
benchmarks/results/tiling-pooling-<method>.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import DEFAULT_DATA
from sklearn.metrics import roc_auc_score
from tiling import subsample

from omniad import create_detector
from omniad.data import MVTecDataset
from omniad.postprocess import image_score

SETTINGS = {"squashed 256": {"image_size": 256},
            "tiled native 256": {"image_size": 256, "tile_size": 256, "tile_stride": 256}}
POOLINGS = {"max": {}, "top1": {"fraction": 0.01}, "mean": {}}


def main() -> None:
    torch.set_num_threads(1)
    method = sys.argv[1]
    extra = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    out = {"method": method, "params": extra}
    for name, setting in SETTINGS.items():
        det = create_detector(method, weights="offline", device="cpu", seed=0, batch_size=16, progress=False,
                              calibration_fraction=0.1, **setting, **extra)
        train = subsample(MVTecDataset(DEFAULT_DATA, split="train", image_size=det.read_size), 100, 0)
        test = MVTecDataset(DEFAULT_DATA, split="test", image_size=det.read_size)
        started = time.perf_counter()
        det.fit(train)
        fit_s = time.perf_counter() - started
        started = time.perf_counter()
        scored = det.score_dataset(test)
        score_s = time.perf_counter() - started
        labels = np.array([s.label for s in test.samples])
        types = np.array([s.category for s in test.samples])
        pools = {"method's own": scored.image_scores.numpy()}
        for pool, options in POOLINGS.items():
            pools[pool] = np.array([float(image_score(m[None], pool, **options)) for m in scored.anomaly_maps])
        result: dict = {}
        for pool, scores in pools.items():
            result[pool] = {t: round(100 * roc_auc_score(labels[types == t], scores[types == t]), 1)
                            for t in sorted(set(types))}
            result[pool]["mixed"] = round(100 * roc_auc_score(labels, scores), 1)
        result["fit_s"], result["score_s"] = round(fit_s), round(score_s)
        out[name] = result
        print(name, json.dumps(result), flush=True)
    Path(__file__).with_name("results").joinpath(f"tiling-pooling-{method}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
