"""PatchCore's coreset searches against each other on the real two-type set: the paper's greedy k-center over every
patch against the chunked search (``omniad.coreset``) at several chunk sizes, over seeds.

The setting of ``benchmarks/speed.py`` (the README's speed table): for each real type, ``--max-train`` training
images (the same seed-0 sample), lite0 offline weights, 256 px, coreset ratio 1%, the paper's image score, each seed
holding out its own random 10% of them (``fit`` now draws its 10% per cluster; the searches compared here see
the same images either way); ``--unified`` adds one model for both types' samples together.
The backbone features are computed once per image set and shared by every variant (the backbone is frozen), so the
variants differ in their memory bank alone. Per model: image AUROC and AU-PRO per type and their mean, the
fit's wall time (the coreset search on cached features) and the bank size.

    python benchmarks/coreset_quality.py --seeds 3 --chunks 16384 65536 --unified
    python benchmarks/coreset_quality.py --summarise results/coreset-quality-*.json   # the table of results files
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import DEFAULT_DATA

from omniad import create_detector
from omniad.data import MVTecDataset
from omniad.data.sources import split_holdout
from omniad.metrics import aupro, auroc

RESULTS = Path(__file__).resolve().parent / "results"


def features_of(detector, dataset) -> torch.Tensor:
    return torch.cat([f.cpu() for f in detector.extract(dataset)])


def evaluate_variant(detector, train_feats, test_feats, truth, keep) -> dict:
    """Fit the bank on the kept training features, score the cached test features; per type and mean."""
    categories, labels, masks = truth
    started = time.perf_counter()
    detector.fit_features(train_feats[keep])
    fit_s = time.perf_counter() - started
    scores = detector.score_cached(test_feats)
    rows = {}
    for cat in sorted(set(categories)):
        idx = [i for i, c in enumerate(categories) if c == cat]
        rows[cat] = {"image_auroc": 100 * auroc(labels[idx], scores.image_scores[idx].numpy()),
                     "aupro": 100 * aupro(masks[idx], scores.anomaly_maps[idx].numpy())}
    rows["mean"] = {k: float(np.mean([rows[c][k] for c in rows])) for k in ("image_auroc", "aupro")}
    return {"fit_seconds": fit_s, "bank": int(detector.net_.memory_bank.shape[0]), "types": rows}


def sampled_train(data: Path, category: str, n: int | None, image_size: int):
    """``n`` training images of ``category`` drawn as ``benchmarks/speed.py`` draws them (seed-0 permutation)."""
    from torch.utils.data import Subset

    train = MVTecDataset(data, categories=[category], split="train", image_size=image_size)
    if n is None or n >= len(train):
        return train
    order = sorted(range(len(train)), key=lambda i: train.samples[i].path.name)
    return Subset(train, sorted(order[i] for i in np.random.default_rng(0).permutation(len(train))[:n]))


def summarise(files: list[Path]) -> str:
    """A markdown table of the results files: per model, variant and type, the mean and range over seeds."""
    rows = [{**r, "variant": f"{r['variant']} [{f.name}]"} for f in files for r in json.loads(f.read_text())["results"]]
    lines = ["| model | coreset search | type | image AUROC, mean (range) | AU-PRO, mean (range) | fit s, mean |",
             "|---|---|---|---|---|---:|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        for variant in dict.fromkeys(r["variant"] for r in rows if r["model"] == model):
            runs = [r for r in rows if r["model"] == model and r["variant"] == variant]
            for cat in runs[0]["types"]:
                cells = []
                for key in ("image_auroc", "aupro"):
                    v = [r["types"][cat][key] for r in runs]
                    cells.append(f"{np.mean(v):.2f} ({min(v):.1f}-{max(v):.1f})")
                fit = np.mean([r["fit_seconds"] for r in runs])
                lines.append(f"| {model} | {variant}, {len(runs)} seeds | {cat} | {cells[0]} | {cells[1]} | "
                             f"{fit:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if sys.argv[1:2] == ["--summarise"]:
        print(summarise([Path(f) for f in sys.argv[2:]]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--categories", nargs="+", default=["kolektor", "magnetic_tile"])
    ap.add_argument("--max-train", type=int, default=233)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--chunks", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--unified", action="store_true", help="also one model for every type's sample together")
    ap.add_argument("--no-greedy", action="store_true", help="leave the paper's search out (its rows are in an "
                    "earlier results file: it is deterministic for a seed)")
    ap.add_argument("--ratio", type=float, default=0.01)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "coreset-quality.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    common = dict(weights="offline", image_size=args.image_size, coreset_ratio=args.ratio, progress=False,
                  calibration_fraction=0.0)
    probe = create_detector("patchcore", **common).prepare()
    sets = {}
    for category in args.categories:
        train = sampled_train(args.data, category, args.max_train, args.image_size)
        test = MVTecDataset(args.data, categories=[category], split="test", image_size=args.image_size)
        samples = [test[i] for i in range(len(test))]
        sets[category] = {"train": features_of(probe, train), "test": features_of(probe, test),
                          "truth": ([x.category for x in samples], np.array([x.label for x in samples]),
                                    np.stack([x.mask.numpy() > 0.5 for x in samples]))}
        print(f"{category}: features of {len(train)} train, {len(test)} test images", flush=True)
    models = {c: [c] for c in args.categories}
    if args.unified:
        models["unified"] = list(args.categories)
    variants = {} if args.no_greedy else {"greedy (paper)": {"coreset": "greedy"}}
    variants.update({f"chunked {c}": {"coreset": "chunked", "coreset_chunk_size": c} for c in args.chunks})
    results = []
    for model, cats in models.items():
        train_feats = torch.cat([sets[c]["train"] for c in cats])
        test_feats = torch.cat([sets[c]["test"] for c in cats])
        truth = tuple(np.concatenate([sets[c]["truth"][k] for c in cats]) if k else
                      sum((sets[c]["truth"][0] for c in cats), []) for k in range(3))
        for seed in range(args.seeds):
            # a seeded random 10% held out, the same for every variant
            kept, _ = split_holdout(torch.utils.data.TensorDataset(torch.arange(len(train_feats))), 0.1, seed)
            keep = torch.tensor(kept.indices)
            for name, params in variants.items():
                detector = create_detector("patchcore", **{**common, **params}, seed=seed).prepare()
                row = {"model": model, "variant": name, "seed": seed,
                       **evaluate_variant(detector, train_feats, test_feats, truth, keep)}
                results.append(row)
                print(json.dumps(row), flush=True)
    meta = {"command": "python benchmarks/coreset_quality.py " + " ".join(sys.argv[1:]),
            "machine": f"{platform.node()}, {os.cpu_count()} cores, torch threads {args.threads}",
            "load_at_end": os.getloadavg()[0], "wall_seconds": time.perf_counter() - started}
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
