"""Why does PMAD rank an unseen type's defects below chance? Measurements on one fit per split.

    python benchmarks/pmad_diagnosis.py --max-train 80 --max-test-per-type 20

For each cross-class split (real: magnetic_tile <-> kolektor; synthetic: textures -> objects) PMAD's CPU preset is
fitted once on the seen types' cached features, and on the unseen type it measures:

  * direction: image AUROC and patch AUROC (defect patches of defective images vs every patch of the good images,
    on PMAD's 16 x 16 patch grid) of each patch score (entropy, cross-entropy, each times the prototype distance,
    the prototype distance alone); below 0.5 = the score points the wrong way;
  * the k-means codebook on the unseen type: distinct tokens used and their perplexity, quantisation distance
    (seen training patches vs unseen normal vs unseen defect patches);
  * the prototypes: mean nearest-prototype distance of seen training patches vs unseen normal / defect patches;
  * the proposal masks: share of the defect patches that the first round (top m = 30%) hides (chance: 0.30);
  * what fixes it: ``feature_residual="image"`` (features minus the image's own mean patch feature, the
    class-adaptive residual the paper's prototypes assume) and prototypes adapted on k normal images.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from common import DEFAULT_DATA, publish
from cross_class import subsample

from omniad import create_detector
from omniad.data import MVTecDataset, make_synthetic_dataset
from omniad.data.protocols import cross_class_split
from omniad.data.sources import iterate_samples

SPLITS = (("real", "magnetic_tile->kolektor"), ("real", "kolektor->magnetic_tile"),
          ("synthetic", "weave,granite->washer,bracket"))
VARIANTS = ("entropy", "cross_entropy", "entropy*prototype", "cross_entropy*prototype", "prototype")


def test_arrays(detector, test) -> tuple[list, np.ndarray, np.ndarray]:
    """Features (one tensor per batch), image labels and (B, h, w) grid masks (a patch is defective when any of
    its pixels is)."""
    feats, labels, masks = [], [], []
    grid = detector.grid
    with torch.no_grad():
        for batch in iterate_samples(test, detector.batch_size):
            feats.append(detector.features(batch.images.to(detector.device_)))
            labels.append(batch.labels.numpy())
            masks.append(F.adaptive_max_pool2d(batch.masks.float().reshape(-1, 1, *batch.masks.shape[-2:]),
                                               grid)[:, 0].numpy() > 0.5)
    return feats, np.concatenate(labels), np.concatenate(masks)


def variants_of(detector, feats: list) -> dict[str, np.ndarray]:
    parts: dict[str, list] = {}
    for f in feats:
        v = detector.patch_score_variants(f)
        v["entropy*prototype"] = v["entropy"] * v["prototype"]
        v["cross_entropy*prototype"] = v["cross_entropy"] * v["prototype"]
        for key, value in v.items():
            parts.setdefault(key, []).append(value.cpu().numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


def image_scores(detector, patch: np.ndarray) -> np.ndarray:
    """PMAD's image score of (B, N) patch scores: the base's score tail (sigma 4, top-1% mean)."""
    maps = torch.from_numpy(patch).view(-1, *detector.grid).float()
    return detector.postprocess(maps, (detector.image_size, detector.image_size)).image_scores.numpy()


def measure(detector, feats, labels, masks) -> dict[str, float]:
    v = variants_of(detector, feats)
    flat_mask = masks.reshape(len(labels), -1)
    good = labels == 0
    defect_patch = flat_mask & (labels[:, None] == 1)
    out = {}
    for key in VARIANTS:
        out[f"I {key}"] = roc_auc_score(labels, image_scores(detector, v[key]))
        pos, neg = v[key][defect_patch], v[key][good].ravel()
        out[f"P {key}"] = roc_auc_score(np.r_[np.ones(pos.size), np.zeros(neg.size)], np.r_[pos, neg])
    order = np.argsort(-v["prototype"], axis=1, kind="stable")
    first = np.zeros_like(flat_mask)
    count = round(0.3 * flat_mask.shape[1])
    np.put_along_axis(first, order[:, :count], True, axis=1)
    out["proposal recall"] = float(first[defect_patch].mean()) if defect_patch.any() else float("nan")
    out["proto dist normal"] = float(v["prototype"][good].mean())
    out["proto dist defect"] = float(v["prototype"][defect_patch].mean())
    return out


def token_stats(detector, train_feats: torch.Tensor, feats, labels, masks) -> dict[str, float]:
    tok = detector.tokenizer_

    def flat(f: torch.Tensor) -> torch.Tensor:
        return f.flatten(2).transpose(1, 2).reshape(-1, f.shape[1])

    seen_d, seen_t = tok.nearest(flat(train_feats[:40]).to(detector.device_))
    unseen = torch.cat([flat(f) for f in feats])
    d, t = tok.nearest(unseen)
    d, t = d.view(len(labels), -1).cpu().numpy(), t.view(len(labels), -1).cpu().numpy()
    flat_mask = masks.reshape(len(labels), -1)
    good = labels == 0

    def perplexity(tokens: np.ndarray) -> float:
        p = np.bincount(tokens.ravel(), minlength=tok.num_tokens) / tokens.size
        p = p[p > 0]
        return float(np.exp(-(p * np.log(p)).sum()))

    return {"tokens seen (perplexity)": perplexity(seen_t.cpu().numpy()),
            "tokens unseen normal (perplexity)": perplexity(t[good]),
            "quant dist seen": float(seen_d.mean()), "quant dist unseen normal": float(d[good].mean()),
            "quant dist unseen defect": float(d[flat_mask & (labels[:, None] == 1)].mean())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--max-train", type=int, default=80)
    parser.add_argument("--max-test-per-type", type=int, default=20)
    parser.add_argument("--synthetic-train", type=int, default=20)
    parser.add_argument("--shots", type=int, default=4, help="normal images of the unseen type for adapted prototypes")
    parser.add_argument("--param", action="append", default=[], help="PMAD parameter KEY=VALUE")
    parser.add_argument("--out", default="benchmarks/results/pmad-diagnosis.md")
    args = parser.parse_args(argv)
    from common import parse_params

    extra = parse_params(args.param)
    started_all = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="omniad-diagnosis-")
    synthetic_root = None
    rows: list[tuple[str, str, dict]] = []
    for kind, split in SPLITS:
        seen, unseen = cross_class_split(split)
        if kind == "real":
            root = Path(args.data)
        else:
            synthetic_root = synthetic_root or make_synthetic_dataset(
                Path(tmp.name), n_train=args.synthetic_train, n_test_good=8, n_test_defect=8, image_size=256, seed=0)
            root = synthetic_root
        train = subsample(MVTecDataset(root, categories=seen, split="train", image_size=256), args.max_train, False, 0)
        test = subsample(MVTecDataset(root, categories=unseen, split="test", image_size=256),
                         args.max_test_per_type, True, 0)
        shots_set = subsample(MVTecDataset(root, categories=unseen, split="train", image_size=256), args.shots,
                              False, 1)
        for residual in ("none", "image"):
            started = time.perf_counter()
            det = create_detector("pmad", preset="cpu", weights="offline", image_size=256, progress=False,
                                  calibration_fraction=0.0, feature_residual=residual, **extra)
            train_feats = det.extract(train)
            det.fit_features(train_feats)
            feats, labels, masks = test_arrays(det, test)
            result = {**measure(det, feats, labels, masks), **token_stats(det, train_feats, feats, labels, masks)}
            det.adapt_prototypes(shots_set)
            adapted = measure(det, feats, labels, masks)
            result.update({f"{k} [k={args.shots} prototypes]": adapted[k] for k in
                           ("I cross_entropy*prototype", "P cross_entropy*prototype", "I prototype", "P prototype",
                            "proposal recall")})
            result["seconds"] = time.perf_counter() - started
            rows.append((split, residual, result))
            print(split, residual, {k: round(v, 3) for k, v in result.items()}, file=sys.stderr, flush=True)
    tmp.cleanup()

    keys = list(rows[0][2])
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    lines = ["# PMAD cross-class diagnosis", "", f"Command: `{command}`  ",
             f"Total wall time {(time.perf_counter() - started_all) / 60:.1f} min on the shared 2-core CPU. PMAD "
             "preset cpu, lite0 offline weights, 256 px, 16 x 16 patch grid; I = image AUROC (sigma 4, top-1% "
             "mean), P = patch AUROC on the grid (defect patches vs all patches of good images). Columns: "
             "train -> test split / feature_residual.", "",
             "| measure | " + " | ".join(f"{s} / {r}" for s, r, _ in rows) + " |",
             "|---|" + "---|" * len(rows)]
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(f"{res[key]:.3f}" for _, _, res in rows) + " |")
    publish(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
