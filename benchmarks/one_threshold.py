"""One threshold for every type, as ``omniad fit`` sets it: each base with and without CADA, per type and mixed,
on clean test normals and on the same normals under a seeded shift (the shifted-normals protocol).

Each CADA model is fitted as a user fits it (``fit``: the stratified 10% hold-out, CADA's defaults over the base,
out-of-fold targets for a memorising base); its base is fitted inside it on the same images and calibrated on the
same held-out normals (``base_.calibration_``), so one fit gives both rows: the base without CADA, and with it.
Per type: image AUROC, and at the one threshold the false-alarm rate on clean and on shifted test normals and the
miss rate; mixed: the image AUROC over every test image of every type.

The shift (``shift_images``), seeded per image: brightness x U(1.05, 1.2), contrast x U(0.8, 0.95), a Gaussian
blur of sigma U(0.5, 1.5) px and a rotation of U(-4, 4) degrees (zoomed in by |cos| + |sin| of the angle, up to
6.7%, so that no black corner enters the image): a lamp, a focus and a fixture that moved. ``--strengths``
scales every departure from the identity.

    python benchmarks/one_threshold.py --bases patchcore padim --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from common import DEFAULT_DATA, summarised
from coreset_quality import sampled_train
from torch.utils.data import ConcatDataset

from omniad import create_detector
from omniad.data import MVTecDataset
from omniad.metrics import auroc

RESULTS = Path(__file__).resolve().parent / "results"
BASES = {  # CPU settings (those of the speed, scale and CADA benchmarks); CADA's own defaults otherwise
    "patchcore": {"coreset_ratio": 0.01},
    "padim": {},
    "revdist": {"preset": "cpu", "iterations": 150},
    "uniad": {"preset": "cpu"},
}


def shift_images(images: torch.Tensor, seed: int, strength: float = 1.0) -> torch.Tensor:
    """The shifted-normals protocol: each image's own seeded brightness, contrast, blur and rotation, each
    departure from the identity scaled by ``strength`` (1: the module docstring's ranges)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for image in images:
        u = torch.rand(4, generator=g).tolist()
        x = TF.adjust_brightness(image, 1 + strength * (0.05 + 0.15 * u[0]))
        x = TF.adjust_contrast(x, 1 - strength * (0.05 + 0.15 * u[1]))
        sigma = strength * (0.5 + u[2])
        if sigma >= 0.1:
            x = TF.gaussian_blur(x, kernel_size=2 * int(3 * sigma) + 1, sigma=sigma)
        # a camera that turned sees more of the scene, not black corners: zoom in just enough to fill them
        angle = strength * (-4 + 8 * u[3])
        zoom = abs(math.cos(math.radians(angle))) + abs(math.sin(math.radians(angle)))
        h, w = x.shape[-2:]
        x = TF.resize(x, [math.ceil(h * zoom), math.ceil(w * zoom)], antialias=True)
        x = TF.center_crop(TF.rotate(x, angle, interpolation=TF.InterpolationMode.BILINEAR), [h, w])
        out.append(x.clamp(0, 1))
    return torch.stack(out)


def rates(scores: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[float, float]:
    flagged = scores > threshold
    return float(flagged[labels == 0].mean()), float((~flagged[labels == 1]).mean())


def shifted_key(strength: float) -> str:
    return "far_shifted" if strength == 1.0 else f"far_shifted_{strength:g}"


def evaluate(scores: np.ndarray, shifted: dict[float, np.ndarray], labels: np.ndarray, cats: np.ndarray,
             threshold: float, normal_cats: np.ndarray) -> dict:
    """Per type and mixed: image AUROC, false alarms and misses at ``threshold``, and the false alarms of the
    shifted normals at each strength (``shifted``: strength -> their scores)."""
    rows = {}
    for cat in sorted(set(cats.tolist())):
        sel = cats == cat
        far, miss = rates(scores[sel], labels[sel], threshold)
        rows[cat] = {"image_auroc": 100 * auroc(labels[sel], scores[sel]), "far": far, "miss": miss}
        rows[cat].update({shifted_key(k): float((v[normal_cats == cat] > threshold).mean())
                          for k, v in shifted.items()})
    far, miss = rates(scores, labels, threshold)
    rows["mixed"] = {"image_auroc": 100 * auroc(labels, scores), "far": far, "miss": miss}
    rows["mixed"].update({shifted_key(k): float((v > threshold).mean()) for k, v in shifted.items()})
    keys = list(rows["mixed"])
    rows["mean"] = {k: float(np.mean([rows[c][k] for c in rows if c != "mixed"])) for k in keys}
    return rows


def to_markdown(data: dict) -> str:
    meta = data["meta"]
    lines = [f"`{meta['command']}` ({meta['machine']}; load {meta['load_start']:.1f} at the start, "
             f"{meta['load_end']:.1f} at the end; {meta['wall_seconds']:.0f} s in all). {meta['setting']}", ""]
    strengths = [k for k in data["models"][0]["rows"]["mixed"] if k.startswith("far_shifted")]
    titles = ["false alarms, shifted" + ("" if k == "far_shifted" else f" x{k.rsplit('_', 1)[1]}") for k in strengths]
    lines += ["| model | type | image AUROC | false alarms, clean | " + " | ".join(titles) + " | misses |",
              "|---|---|---:|---:|" + "---:|" * len(strengths) + "---:|"]
    for model in data["models"]:
        for cat, r in model["rows"].items():
            shifted = " | ".join(f"{100 * r[k]:.1f}%" for k in strengths)
            lines.append(f"| {model['name']} | {cat} | {r['image_auroc']:.1f} | {100 * r['far']:.1f}% | {shifted} | "
                         f"{100 * r['miss']:.1f}% |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if summarised(to_markdown):
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--categories", nargs="+", default=["kolektor", "magnetic_tile"])
    ap.add_argument("--max-train", type=int, default=233, help="training images per type (seed-0 sample)")
    ap.add_argument("--bases", nargs="+", default=list(BASES), choices=sorted(BASES))
    ap.add_argument("--iterations", type=int, default=300, help="CADA's regressor iterations (a CPU setting)")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strengths", type=float, nargs="+", default=[1.0],
                    help="shift strengths scored (1: the docstring's ranges; 0.5: half of each departure)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "one-threshold.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    train = ConcatDataset([sampled_train(args.data, c, args.max_train, args.image_size) for c in args.categories])
    test = MVTecDataset(args.data, categories=args.categories, split="test", image_size=args.image_size)
    samples = [test[i] for i in range(len(test))]
    images = torch.stack([s.image for s in samples])
    labels = np.array([s.label for s in samples])
    cats = np.array([s.category for s in samples])
    normals = images[labels == 0]
    shifted = {s: shift_images(normals, args.seed, s) for s in args.strengths}
    models = []
    for base in args.bases:
        t0 = time.perf_counter()
        cada = create_detector("cada", base=base, base_params=BASES[base], iterations=args.iterations,
                               weights="offline", image_size=args.image_size, seed=args.seed,
                               progress=False).fit(train)
        fit_s = time.perf_counter() - t0
        raw, aligned = cada.score_with_base(images)
        moved = {s: cada.score_with_base(x) for s, x in shifted.items()}  # strength -> (raw, aligned)
        for side, (name, detector, clean) in enumerate(((base, cada.base_, raw),
                                                        (f"cada over {base}", cada, aligned))):
            calibration = detector.calibration_
            rows = evaluate(clean.image_scores.double().numpy(),
                            {s: pair[side].image_scores.double().numpy() for s, pair in moved.items()}, labels, cats,
                            calibration.threshold, cats[labels == 0])
            models.append({"name": name, "fit_seconds": fit_s, "threshold": calibration.threshold,
                           "calibration": calibration.describe(), "clusters": calibration.group_rates(),
                           "target_folds": cada.resolved_.target_folds, "rows": rows})
            print(json.dumps(models[-1]), flush=True)
    meta = {"command": "python benchmarks/one_threshold.py " + " ".join(sys.argv[1:]),
            "machine": f"{platform.node()}, {os.cpu_count()} cores, torch threads {args.threads}",
            "setting": (f"{args.max_train} training images per type (seed-0 sample), lite0 offline, "
                        f"{args.image_size} px, target false-alarm rate 1% on the stratified 10% hold-out, "
                        f"CADA {args.iterations} regressor iterations; {len(normals)} test normals, shifted "
                        f"with seed {args.seed}"),
            "wall_seconds": time.perf_counter() - started, "load_start": load_start, "load_end": os.getloadavg()[0]}
    data = {"meta": meta, "models": models}
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(to_markdown(data))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
