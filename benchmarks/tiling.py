"""Small defects on large images: 256 px squashed vs aspect kept vs tiled at native resolution, on the real
two-type set (../shared/data/industrial: kolektor ~500 x 1260, magnetic_tile ~100-500 px), one unified model for
both types, CADA off (the base alone) and on (CADA over that same fitted base).

    python benchmarks/tiling.py                                   # PaDiM, the three settings
    python benchmarks/tiling.py --train-per-type 60 --test-per-type 80 --setting tiled
    python benchmarks/tiling.py --backbone tf_efficientnet_lite1 --param stages=[1,2]

Reports per type and mixed: image AUROC, AU-PRO (on the maps each setting gives: 256 x 256, the aspect-kept
content, or the stitched native-size map) and the miss rate at the one threshold set on held-out normal images
only, with fit and predict throughput. Writes benchmarks/results/tiling.md (+ .json).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import DEFAULT_DATA, parse_params, pct, publish
from torch.utils.data import Subset

from omniad import create_detector
from omniad.data import MVTecDataset
from omniad.metrics import evaluate

SETTINGS: dict[str, dict[str, Any]] = {
    "squashed 256": {"image_size": 256},
    # kolektor (portrait, ~0.4 wide) fills a 640 x 256 box; magnetic tiles are fitted inside it and padded
    "aspect 640x256": {"image_size": (640, 256)},
    # stride = tile: tiles overlap only where the last one is moved back to the edge (half-tile overlap, the
    # default, costs ~2.5x the tiles on kolektor: more than these 2 shared cores could run here)
    "tiled native 256": {"image_size": 256, "tile_size": 256, "tile_stride": 256},
}


def subsample(dataset: MVTecDataset, per_type: int, seed: int) -> Subset | MVTecDataset:
    """At most ``per_type`` images of each category, drawn with ``random.Random(seed)`` (0: all)."""
    if per_type <= 0:
        return dataset
    keep: list[int] = []
    for category in dataset.categories:
        index = [i for i, r in enumerate(dataset.samples) if r.category == category]
        keep += sorted(random.Random(seed).sample(index, min(per_type, len(index))))
    return Subset(dataset, keep)


def rows_of(report: Any, categories: list[str]) -> dict[str, dict[str, float]]:
    return {name: {key: report.rows[name][key] for key in ("image_auroc", "pixel_aupro", "miss_rate",
                                                          "false_alarm_rate")}
            for name in [*categories, "mixed"]}


def run_setting(name: str, setting: dict[str, Any], args: argparse.Namespace, extra: dict[str, Any]) -> dict:
    common = dict(backbone=args.backbone, weights=args.weights, device="cpu", seed=args.seed, batch_size=16,
                  progress=False, calibration_fraction=0.1, **setting)
    base = create_detector(args.method, **common, **extra)
    train = subsample(MVTecDataset(args.data, split="train", image_size=base.read_size), args.train_per_type,
                      args.seed)
    test_all = MVTecDataset(args.data, split="test", image_size=base.read_size)
    test = subsample(test_all, args.test_per_type, args.seed)
    categories = test_all.categories
    started = time.perf_counter()
    base.fit(train)
    base_fit = time.perf_counter() - started
    off = evaluate(base, test, progress=False)
    print(f"{name}: base fitted in {base_fit:.0f} s, scored {off.meta['images_per_second']:.1f} images/s",
          flush=True)
    result = {
        "setting": name, "params": {k: list(v) if isinstance(v, tuple) else v for k, v in setting.items()},
        "n_train": len(train), "n_test": len(test), "map_size": off.meta["map_size"],
        "off": {"rows": rows_of(off, categories), "fit_s": base_fit,
                "fit_images_per_s": len(train) / base_fit, "predict_images_per_s": off.meta["images_per_second"]},
    }
    cada = create_detector("cada", base=base, iterations=args.cada_iterations, **common)
    started = time.perf_counter()
    try:
        cada.fit(train)  # the base came fitted: CADA collects its maps of these images and trains the regressor
    except FloatingPointError as err:  # a diverged regressor is a result to report, not a reason to lose the run
        print(f"{name}: CADA failed: {err}", flush=True)
        result["on"] = {"error": str(err)}
        return result
    cada_fit = time.perf_counter() - started
    on = evaluate(cada, test, progress=False)
    print(f"{name}: CADA fitted in {cada_fit:.0f} s, scored {on.meta['images_per_second']:.1f} images/s",
          flush=True)
    result["on"] = {"rows": rows_of(on, categories), "fit_s": cada_fit, "fit_images_per_s": len(train) / cada_fit,
                    "predict_images_per_s": on.meta["images_per_second"]}
    return result


def table(results: list[dict], categories: list[str]) -> list[str]:
    head = ["setting", "CADA"]
    for name in [*categories, "mixed"]:
        head += [f"{name} AUROC", f"{name} AU-PRO", f"{name} miss"]
    head += ["fit img/s", "predict img/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in results:
        for key, label in (("off", "off"), ("on", "on")):
            part = res[key]
            cells = [res["setting"], label]
            if "error" in part:
                lines.append("| " + " | ".join(cells + [f"failed: {part['error']}"]) + " |")
                continue
            for name in [*categories, "mixed"]:
                row = part["rows"][name]
                cells += [pct(row["image_auroc"]), pct(row["pixel_aupro"]), pct(row["miss_rate"])]
            cells += [f"{part['fit_images_per_s']:.1f}", f"{part['predict_images_per_s']:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="MVTec-style root")
    parser.add_argument("--method", default="padim")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--weights", default="offline")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="method parameter")
    parser.add_argument("--setting", action="append", choices=list(SETTINGS), help="default: all three")
    parser.add_argument("--train-per-type", type=int, default=120, help="training images per type (0: all)")
    parser.add_argument("--test-per-type", type=int, default=150, help="test images per type (0: all)")
    parser.add_argument("--cada-iterations", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/tiling", help="file stem of the .md and .json")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="only write one table from earlier runs' JSON")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args)
    if not Path(args.data).is_dir():
        print(f"benchmark data not found at {args.data}", file=sys.stderr)
        return 2
    torch.set_num_threads(int(os.environ.get("OMNIAD_THREADS", "1")))  # 2 threads under load: many times slower
    extra = parse_params(args.param)
    load_before = os.getloadavg()
    started = time.perf_counter()
    results = [run_setting(name, SETTINGS[name], args, extra) for name in (args.setting or list(SETTINGS))]
    wall = time.perf_counter() - started
    categories = MVTecDataset(args.data, split="test", image_size=None).categories
    command = "python benchmarks/tiling.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"# Squashed vs aspect kept vs tiled: {args.method} ({args.backbone}, {args.weights} weights)", "",
        f"`{command}` on {args.data.rstrip('/').split('/')[-1]} ({', '.join(categories)}); one unified model for "
        f"both types; {results[0]['n_train']} training images ({args.train_per_type or 'all'} per type, seeded "
        f"subsample, 10% held out for the one threshold), {results[0]['n_test']} test images "
        f"({args.test_per_type or 'all'} per type). CADA: over the same fitted base, {args.cada_iterations} "
        f"regressor iterations. Extra parameters: {extra or 'none'}.", "",
        "AUROC = image AUROC, AU-PRO on the maps each setting gives (256 x 256; the aspect-kept content; the "
        "stitched native-size map), miss = share of defective images under the one threshold (target false-alarm "
        "rate 1% on held-out normals). Throughput: images per second (fit: training images over the whole fit; "
        "for CADA the regressor's fit over an already fitted base).", "",
        *table(results, categories), "",
        f"Wall time {wall / 60:.1f} min on {os.cpu_count()} CPU cores shared with other jobs; load average "
        f"{load_before[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.",
    ]
    publish(lines, args.out + ".md")
    Path(args.out + ".json").write_text(json.dumps({"command": command, "results": results, "wall_s": wall,
                                                    "load": [load_before, os.getloadavg()]}, indent=1))
    return 0


def merge(args: argparse.Namespace) -> int:
    """One table from several runs (e.g. one setting per process, run one after another)."""
    runs = [json.loads(Path(path).read_text()) for path in args.merge]
    results = [res for run in runs for res in run["results"]]
    categories = [c for c in results[0]["off"]["rows"] if c != "mixed"]
    lines = [f"# Squashed vs aspect kept vs tiled ({len(runs)} runs merged)", ""]
    for run, path in zip(runs, args.merge, strict=True):
        lines += [f"- `{run['command']}` ({Path(path).name}): {run['wall_s'] / 60:.1f} min, load average "
                  f"{run['load'][0][0]:.1f} at the start, {run['load'][1][0]:.1f} at the end"]
    lines += ["", *table(results, categories)]
    publish(lines, args.out + ".md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
