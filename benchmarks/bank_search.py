"""PatchCore's memory-bank searches against each other on the real two-type set: the exact search (float32, and
over a float16 bank) against faiss's inverted-file search (``search="ivf"``) at several ``nprobe``.

One unified model for both real types (the setting of ``benchmarks/coreset_quality.py --unified``: 233 training
images per type, seed 0's 10% held out, lite0 offline weights, 256 px, the paper's image score), its bank searched
once per coreset ratio with the default chunked search (``--ratios``: 1%, and 10%, the library's default, whose bank
is ten times larger). Every variant then scores the same cached test features with the same bank: they differ in
the search alone. Per variant: image AUROC and AU-PRO per type, their mean, the mixed image AUROC, the share of
test patches whose nearest entry the search missed, and the scoring wall time over the test set (from features:
the search's cost, without the backbone).

    python benchmarks/bank_search.py --ratios 0.01 0.1 --nprobe 1 4 8 16 32
    python benchmarks/bank_search.py --summarise results/bank-search.json   # its table again
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
from common import DEFAULT_DATA, summarised
from coreset_quality import features_of, sampled_train

from omniad import create_detector
from omniad.cluster import NearestSearch
from omniad.data import MVTecDataset
from omniad.data.sources import split_holdout
from omniad.metrics import aupro, auroc

RESULTS = Path(__file__).resolve().parent / "results"


def evaluate(detector, test_feats, truth) -> dict:
    categories, labels, masks = truth
    started = time.perf_counter()
    scores = detector.score_cached(test_feats)
    seconds = time.perf_counter() - started
    types = {}
    for cat in sorted(set(categories)):
        idx = [i for i, c in enumerate(categories) if c == cat]
        types[cat] = {"image_auroc": 100 * auroc(labels[idx], scores.image_scores[idx].numpy()),
                      "aupro": 100 * aupro(masks[idx], scores.anomaly_maps[idx].numpy())}
    mean = {k: float(np.mean([types[c][k] for c in types])) for k in ("image_auroc", "aupro")}
    return {"types": types, "mean": mean, "mixed_image_auroc": 100 * auroc(labels, scores.image_scores.numpy()),
            "score_seconds": seconds, "images_per_second": len(labels) / seconds}


def use_search(net, bank: torch.Tensor, dtype: torch.dtype, nlist: int | None, nprobe: int) -> None:
    """Point the fitted net at ``bank`` in ``dtype``, searched exactly (nlist None) or by IVF."""
    net.memory_bank = bank.to(dtype).clone()
    net.nlist, net.nprobe = nlist, nprobe


def missed(net, bank: torch.Tensor, queries: torch.Tensor) -> float:
    """Share of ``queries`` whose nearest bank entry the net's search does not return (a distance above the
    exact one by more than float rounding)."""
    exact = NearestSearch(bank)(queries)[0]
    found = net._search()(queries)[0]
    return float((found > exact * (1 + 1e-4) + 1e-5).float().mean())


def to_markdown(data: dict) -> str:
    """The table of a results file: one row per (coreset ratio, variant)."""
    meta = data["meta"]
    lines = [f"`{meta['command']}` ({meta['machine']}; load {meta['load_at_end']:.1f} at the end; "
             f"{meta['wall_seconds']:.0f} s in all)", "",
             "| coreset ratio | bank | search | nearest entry missed | image AUROC kolektor / magnetic_tile | "
             "AU-PRO kolektor / magnetic_tile | mean image AUROC / AU-PRO | mixed image AUROC | scoring img/s |",
             "|---|---:|---|---:|---|---|---|---:|---:|"]
    for r in data["results"]:
        t = r["types"]
        search = r["variant"] + (f" (nlist {r['nlist']})" if r["nlist"] else "")
        lines.append(
            f"| {r['ratio']:g} | {r['bank']} | {search} | {100 * r['missed_nearest']:.2f}% | "
            f"{t['kolektor']['image_auroc']:.2f} / {t['magnetic_tile']['image_auroc']:.2f} | "
            f"{t['kolektor']['aupro']:.2f} / {t['magnetic_tile']['aupro']:.2f} | "
            f"{r['mean']['image_auroc']:.2f} / {r['mean']['aupro']:.2f} | {r['mixed_image_auroc']:.2f} | "
            f"{r['images_per_second']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if summarised(to_markdown):
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--categories", nargs="+", default=["kolektor", "magnetic_tile"])
    ap.add_argument("--max-train", type=int, default=233)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.01, 0.1])
    ap.add_argument("--nprobe", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "bank-search.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:  # faiss's own OpenMP threads, as many as torch's
        import faiss

        faiss.omp_set_num_threads(args.threads)
    except ImportError:
        pass
    started = time.perf_counter()
    common = dict(weights="offline", image_size=args.image_size, progress=False, calibration_fraction=0.0)
    probe = create_detector("patchcore", **common).prepare()
    train, test, truth = [], [], ([], [], [])
    for category in args.categories:
        train_set = sampled_train(args.data, category, args.max_train, args.image_size)
        test_set = MVTecDataset(args.data, categories=[category], split="test", image_size=args.image_size)
        samples = [test_set[i] for i in range(len(test_set))]
        train.append(features_of(probe, train_set))
        test.append(features_of(probe, test_set))
        truth[0].extend(x.category for x in samples)
        truth[1].extend(x.label for x in samples)
        truth[2].extend(x.mask.numpy() > 0.5 for x in samples)
        print(f"{category}: features of {len(train_set)} train, {len(test_set)} test images", flush=True)
    train_feats, test_feats = torch.cat(train), torch.cat(test)
    truth = (truth[0], np.array(truth[1]), np.stack(truth[2]))
    kept, _ = split_holdout(torch.utils.data.TensorDataset(torch.arange(len(train_feats))), 0.1, 0)
    queries = test_feats[:: max(1, len(test_feats) // 64)].permute(0, 2, 3, 1).reshape(-1, test_feats.shape[1])
    results = []
    for ratio in args.ratios:
        detector = create_detector("patchcore", **common, coreset_ratio=ratio, search="ivf").prepare()
        t0 = time.perf_counter()
        detector.fit_features(train_feats[torch.tensor(kept.indices)])
        fit_s = time.perf_counter() - t0
        net = detector.net_
        bank = net.memory_bank.clone()
        nlist = net.nlist  # the default cells for this bank size
        variants = [("exact", torch.float32, None, 1), ("exact, float16 bank", torch.float16, None, 1)]
        variants += [(f"ivf nprobe {p}", torch.float32, nlist, p) for p in args.nprobe]
        variants += [("ivf nprobe 8, float16 bank", torch.float16, nlist, 8)]
        for name, dtype, cells, nprobe in variants:
            use_search(net, bank, dtype, cells, nprobe)
            t0 = time.perf_counter()
            share = missed(net, bank.to(dtype).float(), queries)
            build_s = time.perf_counter() - t0  # the index's build (an IVF's k-means) and the exact reference search
            row = {"ratio": ratio, "bank": int(bank.shape[0]), "nlist": cells, "variant": name, "fit_seconds": fit_s,
                   "index_seconds": build_s, "missed_nearest": share, **evaluate(detector, test_feats, truth)}
            results.append(row)
            print(json.dumps(row), flush=True)
    meta = {"command": "python benchmarks/bank_search.py " + " ".join(sys.argv[1:]),
            "machine": f"{platform.node()}, {os.cpu_count()} cores, torch threads {args.threads}",
            "load_at_end": os.getloadavg()[0], "wall_seconds": time.perf_counter() - started}
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(to_markdown({"meta": meta, "results": results}))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
