"""How fitting one model grows with the line: fit wall time, peak resident memory and model size against the number
of training images, on a many-type line, with the quality on the real types beside it.

The line: ``--real-per-type`` training images of each real type (../shared/data/industrial: kolektor and
magnetic_tile, seeded subsample) plus a synthetic line of 20 types filling it up to each size. The 20 types are the
generator's four renderers, each in five variants (a channel permutation, a brightness and a quarter turn per
variant), 256 px. Every (method, size) fits in a fresh process, so its peak memory is its own. Test sets: every
test image of the real types, and 5 good + 5 defective images of each synthetic type; image AUROC per set, AU-PRO
on the real types; scoring throughput over the real test images (from tensors in memory: the model's cost, not
decoding). The fitted exponent is the slope of log(fit time) against log(images) between 1,000 and the largest
size measured.

    python benchmarks/scale.py --sizes 500 1000 2000 5000 10000 --methods patchcore padim
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import DEFAULT_DATA
from PIL import Image

RESULTS = Path(__file__).resolve().parent / "results"
SYNTHETIC_TYPES = 20
SYNTHETIC_TEST = (5, 5)  # good, defective per synthetic type
PERMUTATIONS = [(0, 1, 2), (1, 2, 0), (2, 0, 1), (0, 2, 1), (2, 1, 0)]
# CPU settings of each method; PatchCore at the 1% coreset of the measurement and the speed benchmark
METHODS = {
    "patchcore": ("patchcore", {"coreset_ratio": 0.01}),
    "patchcore-greedy": ("patchcore", {"coreset_ratio": 0.01, "coreset": "greedy"}),
    "patchcore-ivf": ("patchcore", {"coreset_ratio": 0.01, "search": "ivf"}),
    "padim": ("padim", {}),
    "cada-padim": ("cada", {"base": "padim", "iterations": 300}),
    "cada-patchcore": ("cada", {"base": "patchcore", "base_params": {"coreset_ratio": 0.01}, "iterations": 300}),
    "uniad": ("uniad", {"preset": "cpu"}),
    "mkd": ("mkd", {"preset": "cpu"}),
}


def synthetic_type(t: int) -> tuple[str, int]:
    from omniad.data.synthetic import SYNTHETIC_CATEGORIES

    return SYNTHETIC_CATEGORIES[t % len(SYNTHETIC_CATEGORIES)], t // len(SYNTHETIC_CATEGORIES)


def variant(rgb: np.ndarray, v: int) -> np.ndarray:
    """Variant ``v`` of a rendered image: its own channel order, brightness and orientation."""
    out = rgb[..., list(PERMUTATIONS[v % len(PERMUTATIONS)])].astype(np.float32) * (0.8 + 0.1 * v)
    return np.ascontiguousarray(np.rot90(np.clip(out, 0, 255).astype(np.uint8), k=v % 4))


def write_line(root: Path, per_type: int, size: int = 256) -> Path:
    """The 20-type synthetic line in the MVTec layout (train: ``per_type`` images a type; test: SYNTHETIC_TEST)."""
    from omniad.data.synthetic import render_sample

    marker = root / f"line-{per_type}-{size}.done"
    if marker.is_file():
        return root
    for t in range(SYNTHETIC_TYPES):
        base, v = synthetic_type(t)
        name = f"syn{t:02d}-{base}-v{v}"
        folders = {k: root / name / k for k in ("train/good", "test/good", "test/defect", "ground_truth/defect")}
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_type):
            Image.fromarray(variant(render_sample(base, "train", i, size, seed=v)[1], v)).save(
                folders["train/good"] / f"{i:04d}.png")
        for i in range(SYNTHETIC_TEST[0]):
            Image.fromarray(variant(render_sample(base, "good", i, size, seed=v)[1], v)).save(
                folders["test/good"] / f"{i:03d}.png")
        for i in range(SYNTHETIC_TEST[1]):
            _, image, mask, _ = render_sample(base, "defect", i, size, seed=v)
            Image.fromarray(variant(image, v)).save(folders["test/defect"] / f"{i:03d}.png")
            Image.fromarray(variant(np.repeat(mask[..., None] * 255, 3, 2).astype(np.uint8), v)[..., 0]).save(
                folders["ground_truth/defect"] / f"{i:03d}_mask.png")
    marker.write_text("ok")
    return root


def training_set(line: Path, real: Path, n: int, real_per_type: int, image_size: int, seed: int):
    """``real_per_type`` images of each real type plus the synthetic line's first images, round robin over its
    types, up to ``n`` images in all."""
    from torch.utils.data import ConcatDataset, Subset

    from omniad.data import MVTecDataset

    real_train = MVTecDataset(real, split="train", image_size=image_size)
    g = torch.Generator().manual_seed(seed)
    picked = []
    for cat in real_train.categories:
        idx = [i for i, s in enumerate(real_train.samples) if s.category == cat]
        picked += [idx[j] for j in torch.randperm(len(idx), generator=g)[:real_per_type].tolist()]
    synthetic = MVTecDataset(line, split="train", image_size=image_size)
    by_type: dict[str, list[int]] = {}
    for i, s in enumerate(synthetic.samples):
        by_type.setdefault(s.category, []).append(i)
    need = n - len(picked)
    order = [by_type[c][k] for k in range(max(map(len, by_type.values()))) for c in sorted(by_type)
             if k < len(by_type[c])][:need]
    if len(order) < need:
        raise SystemExit(f"the synthetic line holds {len(order)} images, {need} needed: raise --per-type")
    return ConcatDataset([Subset(real_train, picked), Subset(synthetic, sorted(order))])


def run_one(args: argparse.Namespace) -> dict:
    """One (method, size) fit and its evaluation, in this process (a subprocess of ``main``)."""
    from omniad import create_detector
    from omniad.data import MVTecDataset
    from omniad.memory import peak_rss_bytes
    from omniad.metrics import aupro, auroc

    torch.set_num_threads(args.threads)
    method, params = METHODS[args.method]
    train = training_set(args.line, args.data, args.size, args.real_per_type, args.image_size, args.seed)
    detector = create_detector(method, weights="offline", image_size=args.image_size, seed=args.seed,
                               calibration_fraction=0.0, progress=False, **params)
    detector.fit(train)
    with tempfile.TemporaryDirectory() as tmp:
        detector.save(tmp)
        model_mb = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file()) / 2**20
    row = {"method": args.method, "images": len(train), "fit_seconds": detector.fit_seconds_,
           "fit_peak_memory_mb": detector.fit_peak_memory_mb_, "model_mb": model_mb}
    for name, root in (("real", args.data), ("synthetic", args.line)):
        test = MVTecDataset(root, split="test", image_size=args.image_size)
        samples = [test[i] for i in range(len(test))]
        images = torch.stack([s.image for s in samples])
        started = time.perf_counter()
        scores = detector.score_dataset(images, "scoring")
        seconds = time.perf_counter() - started
        labels = np.array([s.label for s in samples])
        cats = [s.category for s in samples]
        per_type = {}
        for cat in sorted(set(cats)):
            idx = [i for i, c in enumerate(cats) if c == cat]
            per_type[cat] = {"image_auroc": 100 * auroc(labels[idx], scores.image_scores[idx].numpy())}
            if name == "real":
                masks = np.stack([samples[i].mask.numpy() > 0.5 for i in idx])
                per_type[cat]["aupro"] = 100 * aupro(masks, scores.anomaly_maps[idx].numpy())
        row[name] = {"types": per_type, "mean_image_auroc": float(np.mean([v["image_auroc"]
                                                                            for v in per_type.values()])),
                     "mixed_image_auroc": 100 * auroc(labels, scores.image_scores.numpy()),
                     "images_per_second": len(samples) / seconds}
        if name == "real":
            row[name]["mean_aupro"] = float(np.mean([v["aupro"] for v in per_type.values()]))
    row["process_peak_memory_mb"] = peak_rss_bytes() / 2**20
    return row


def exponent(rows: list[dict], low: int = 1000) -> float | None:
    """Slope of log(fit seconds) against log(images) over the sizes >= ``low`` (least squares)."""
    pts = [(math.log(r["images"]), math.log(r["fit_seconds"])) for r in rows if r["images"] >= low]
    if len(pts) < 2:
        return None
    x, y = np.array(pts).T
    return float(np.polyfit(x, y, 1)[0])


def to_markdown(rows: list[dict], meta: dict) -> str:
    lines = ["# How fitting grows with the line", "", f"`{meta['command']}`", "",
             f"{meta['machine']}; line: {meta['line']}; wall time {meta['wall_seconds'] / 60:.1f} min; "
             f"load (1 min) at the start {meta['load_start']:.1f}, at the end {meta['load_end']:.1f}.", "",
             "| method | images | fit s | fit peak MB | model MB | real: image AUROC kolektor / magnetic_tile "
             "| real: AU-PRO mean | real mixed AUROC | synthetic mean / mixed AUROC | scoring img/s |",
             "|---|---:|---:|---:|---:|---|---:|---:|---|---:|"]
    for r in rows:
        real, syn = r["real"], r["synthetic"]
        types = " / ".join(f"{real['types'][c]['image_auroc']:.1f}" for c in sorted(real["types"]))
        lines.append(f"| {r['method']} | {r['images']} | {r['fit_seconds']:.0f} | {r['fit_peak_memory_mb']:.0f} | "
                     f"{r['model_mb']:.1f} | {types} | {real['mean_aupro']:.1f} | {real['mixed_image_auroc']:.1f} | "
                     f"{syn['mean_image_auroc']:.1f} / {syn['mixed_image_auroc']:.1f} | "
                     f"{real['images_per_second']:.1f} |")
    lines += ["", "Fitted exponent of fit time against images (sizes >= 1,000):", ""]
    for method in dict.fromkeys(r["method"] for r in rows):
        e = exponent([r for r in rows if r["method"] == method])
        lines.append(f"- {method}: {'n/a (fewer than two sizes)' if e is None else f'{e:.2f}'}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[500, 1000, 2000, 5000, 10000])
    ap.add_argument("--methods", nargs="+", default=["patchcore", "padim"], choices=sorted(METHODS))
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--line", type=Path, default=Path(tempfile.gettempdir()) / "omniad-scale-line")
    ap.add_argument("--per-type", type=int, default=500, help="synthetic training images per type written")
    ap.add_argument("--real-per-type", type=int, default=200)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "scale")
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "SIZE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        args.method, args.size = args.one[0], int(args.one[1])
        print(json.dumps(run_one(args)), flush=True)
        return
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    write_line(args.line, args.per_type, args.image_size)
    print(f"line written in {time.perf_counter() - started:.0f} s", flush=True)
    rows = []
    out_json = args.out.with_suffix(".json")
    for method in args.methods:
        for size in args.sizes:
            cmd = [sys.executable, __file__, "--one", method, str(size), *_passthrough(args)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{method} at {size} failed:\n{done.stderr[-3000:]}", flush=True)
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
            meta = {"command": "python benchmarks/scale.py " + " ".join(sys.argv[1:]),
                    "machine": f"{platform.node()}, {os.cpu_count()} cores, torch threads {args.threads}",
                    "line": f"{args.real_per_type} real images per type + 20 synthetic types (256 px)",
                    "wall_seconds": time.perf_counter() - started, "load_start": load_start,
                    "load_end": os.getloadavg()[0]}
            out_json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
            args.out.with_suffix(".md").write_text(to_markdown(rows, meta))
    print(f"wrote {out_json} and {args.out.with_suffix('.md')}")


def _passthrough(args: argparse.Namespace) -> list[str]:
    return ["--data", str(args.data), "--line", str(args.line), "--real-per-type", str(args.real_per_type),
            "--image-size", str(args.image_size), "--seed", str(args.seed), "--threads", str(args.threads)]


if __name__ == "__main__":
    main()
