"""Cross-class (one-for-all) benchmark: train on the normal images of the *seen* types, test on *unseen* types.

    python benchmarks/cross_class.py                       # PMAD vs PatchCore (and UniAD when registered)
    python benchmarks/cross_class.py --method pmad --max-train 120 --max-test-per-type 20

Settings, every method under the same protocol (lite0 offline weights, 256 px, sigma-4 maps, pixel metrics):
  * real:      magnetic_tile -> kolektor, kolektor -> magnetic_tile (../shared/data/industrial)
  * synthetic: weave,granite -> washer,bracket (textures -> objects) and the reverse, on
               ``omniad.data.synthetic.make_synthetic_dataset``
  * unified:   PMAD trained on both real types, tested on both (the one-for-many reference point)
Training and test sets may be sub-sampled (seeded, per category / per defect type) to fit a CPU budget; the
counts used are written beside every row. Writes a Markdown table with the command and wall times.
"""

from __future__ import annotations

import argparse
import math
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # the package is not pip-installed here
from common import DEFAULT_DATA, batch_samples, parse_params, publish, scored_set

from omniad import create_detector, list_detectors, load_detector
from omniad.adaptation import adapt, recalibrate
from omniad.data import MVTecDataset, make_synthetic_dataset
from omniad.data.protocols import cross_class_split
from omniad.data.sources import iterate_samples
from omniad.features import feature_cat, feature_slice, feature_to
from omniad.methods.base import concat_scores
from omniad.metrics import describe_detector, evaluate, report_from_scores
from omniad.types import AnomalyScores

# CPU settings of each method in this benchmark (the detectors' defaults stay the papers').
CPU_SETTINGS: dict[str, dict] = {
    "pmad": {"preset": "cpu"},
    "patchcore": {"coreset_ratio": 0.01, "coreset": "greedy", "coreset_candidates": 100_000},
    "uniad": {"preset": "cpu"},
}
REAL_SPLITS = ("magnetic_tile->kolektor", "kolektor->magnetic_tile")
SYNTHETIC_SPLITS = ("weave,granite->washer,bracket", "washer,bracket->weave,granite")
METRICS = (("image_auroc", "I-AUROC"), ("image_ap", "I-AP"), ("pixel_auroc", "P-AUROC"), ("pixel_aupro", "AUPRO"))


def subsample(dataset: MVTecDataset, per_group: int | None, by_type: bool, seed: int):
    """Seeded subset with at most ``per_group`` images per category (or per category and defect type)."""
    if not per_group:
        return dataset
    groups: dict[tuple, list[int]] = {}
    for i, record in enumerate(dataset.samples):
        key = (record.category, record.defect_type) if by_type else (record.category,)
        groups.setdefault(key, []).append(i)
    rng = np.random.default_rng(seed)
    keep = []
    for idx in groups.values():
        keep += sorted(rng.choice(idx, size=min(per_group, len(idx)), replace=False).tolist())
    return Subset(dataset, sorted(keep))


def score_variants(detector, test, keys: list[str]) -> tuple[dict[str, AnomalyScores], list, float]:
    """Every PMAD score variant in ``keys`` of every test image, from one scoring pass (``PMAD.score_variants``).

    Returns:
        The scores per variant, the test samples without their pixels (same order) and the seconds spent scoring.
    """
    parts: dict[str, list[AnomalyScores]] = {key: [] for key in keys}
    samples, seconds = [], 0.0
    for batch in iterate_samples(test, detector.batch_size):
        started = time.perf_counter()
        variants = detector.score_variants(batch.images)
        seconds += time.perf_counter() - started
        for key in keys:
            parts[key].append(variants[key])
        samples += batch_samples(batch)
    scores = {key: AnomalyScores(torch.cat([p.image_scores for p in batches]),
                                 torch.cat([p.anomaly_maps for p in batches])) for key, batches in parts.items()}
    return scores, samples, seconds


def run(method: str, params: dict, train, test, variants: list[str] | None) -> list[tuple[str, object, float, float]]:
    """Fit once; evaluate (each PMAD score variant from the same scoring pass). -> (label, report, fit s, eval s)."""
    detector = create_detector(method, **params)
    started = time.perf_counter()
    detector.fit(train)
    fit_s = time.perf_counter() - started
    out = []
    started = time.perf_counter()
    if variants:
        scores, samples, seconds = score_variants(detector, test, variants)
        meta = describe_detector(detector)
        reports = {key: report_from_scores(scored_set(samples, scores[key], score_seconds=seconds),
                                           detector.calibration_, meta) for key in variants}
        eval_s = time.perf_counter() - started
        out = [(f"{method} [{key}]", report, fit_s, eval_s) for key, report in reports.items()]
    else:
        report = evaluate(detector, test, progress=False)
        out = [(method, report, fit_s, time.perf_counter() - started)]
    for label, report, _, eval_s in out:
        print(f"  {label}: fit {fit_s:.0f} s, eval {eval_s:.0f} s, mean I-AUROC "
              f"{report.rows['mean']['image_auroc']:.3f}", file=sys.stderr, flush=True)
    return out


# ----------------------------------------------------------------- a new type: zero-shot, few-shot, recalibration
SHOTS = (0, 1, 4, 8)
NEW_TYPE_METHODS: dict[str, tuple[str, dict]] = {
    "pmad": ("pmad", {"preset": "cpu"}),
    "pmad residual": ("pmad", {"preset": "cpu", "feature_residual": "image"}),
    "patchcore": ("patchcore", CPU_SETTINGS["patchcore"]),
    "musc (zero-shot)": ("musc", {}),
}


def cached_test(detector, test) -> tuple[object, list]:
    """``features`` of every test image (computed once, on the CPU) and the samples without their pixels."""
    feats, samples = [], []
    with torch.no_grad():
        for batch in iterate_samples(test, detector.batch_size):
            feats.append(feature_to(detector.features(batch.images.to(detector.device_)), "cpu", torch.float32))
            samples += batch_samples(batch)
    return feature_cat(feats), samples


def score_in_lots(model, feats, count: int, lot: int | None, seed: int) -> AnomalyScores:
    """musc's scores of a whole test set, the images scored against each other in seeded random lots of about
    ``lot`` images (MuSc's subsets: the cost grows with the square of a lot's size); None: one lot."""
    if not lot or count <= lot:
        return model.score_cached(feats)
    order = torch.as_tensor(np.random.default_rng(seed).permutation(count))
    shuffled = feats[order] if isinstance(feats, torch.Tensor) else [f[order] for f in feats]
    bounds = np.cumsum([0, *map(len, np.array_split(np.arange(count), math.ceil(count / lot)))])
    scores = concat_scores([model.score_cached(feature_slice(shuffled, int(a), int(b)))
                            for a, b in zip(bounds[:-1], bounds[1:])])
    back = torch.argsort(order)  # each image's row in the shuffled order
    return AnomalyScores(scores.image_scores[back], scores.anomaly_maps[back])


def new_type_rows(label: str, method: str, params: dict, split: str, train, tests: dict, shots: dict,
                  folder: Path, ks: tuple[int, ...], lot: int | None, seed: int) -> list[str]:
    """One fit on the seen types; per unseen type and k: adapt on k normals (a fresh copy of the saved model),
    score the cached test features, recalibrate on the same k normals (target 0: the highest of their scores).
    musc's scores do not depend on k (zero-shot): they are computed once per type."""
    started = time.perf_counter()
    fitted = create_detector(method, **params).fit(train)  # holds out 10% of the seen types for its threshold
    fit_s = time.perf_counter() - started
    fitted.save(folder / "model")
    before = fitted.calibration_
    rows = []
    for category, test in tests.items():
        feats, samples = cached_test(fitted, test)
        normal = np.array([s.label == 0 for s in samples])
        zero_shot = None
        for k in ks:
            if method == "musc" and k == 1:
                continue  # mutual scoring needs 2 normals to calibrate
            started = time.perf_counter()
            model = load_detector(folder / "model")
            model.progress = False
            if k and method != "musc":  # adapted on the k normals, threshold from them left-one-out
                adapt(model, shots[category][:k], 0.0)
            if method == "musc":
                if zero_shot is None:
                    zero_shot = score_in_lots(model, feats, len(samples), lot, seed)
                scores = zero_shot
            else:
                scores = model.score_cached(feats)
            report = report_from_scores(scored_set(samples, scores), None, describe_detector(model)).rows[category]
            values = scores.image_scores.double().numpy()
            far_before = float(np.mean(values[normal] > before.threshold))
            after = caught = "n/a"
            if k:
                if method == "musc":  # zero-shot: the k normals scored against each other
                    recalibrate(model, shots[category][:k], 0.0)
                threshold = model.threshold_
                after = f"{np.mean(values[normal] > threshold):.2f}"
                caught = f"{np.mean(values[~normal] > threshold):.2f}"
            rows.append(f"| {split} | {category} | {label} | {k} | {report['image_auroc']:.3f} | "
                        f"{report['pixel_auroc']:.3f} | {report['pixel_aupro']:.3f} | {far_before:.2f} | {after} | "
                        f"{caught} | {report['n_normal']}+{report['n_defective']} | {fit_s:.0f} | "
                        f"{time.perf_counter() - started:.0f} |")
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def run_new_type(args, jobs: list) -> list[str]:
    """The new-type table: every method of ``NEW_TYPE_METHODS`` on every cross-class job."""
    rows: list[str] = []
    with tempfile.TemporaryDirectory(prefix="omniad-new-type-") as tmp:
        for _, split, root, train_cats, test_cats, _ in jobs:
            real = root == Path(args.data)
            train = MVTecDataset(root, categories=train_cats, split="train", image_size=args.image_size)
            if real:
                train = subsample(train, args.max_train, False, args.seed)
            tests, shots = {}, {}
            for category in test_cats:
                test = MVTecDataset(root, categories=[category], split="test", image_size=args.image_size)
                tests[category] = subsample(test, args.max_test_per_type, True, args.seed) if real else test
                pool = MVTecDataset(root, categories=[category], split="train", image_size=args.image_size)
                pick = np.random.default_rng(args.seed).choice(len(pool), size=max(args.shots), replace=False)
                shots[category] = torch.stack([pool[int(i)].image for i in pick])  # the new type's k normals
            for label, (method, settings) in NEW_TYPE_METHODS.items():
                if args.new_type_methods and label not in args.new_type_methods:
                    continue
                params = {**settings, "weights": args.weights, "image_size": args.image_size, "seed": args.seed,
                          "progress": False}
                rows += new_type_rows(label, method, params, split, train, tests, shots, Path(tmp),
                                      tuple(args.shots), args.musc_lot, args.seed)
    return rows


def new_type_table(args, argv, rows: list[str], seconds: float) -> list[str]:
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    return [
        "# A type never seen: cross-class, few-shot and zero-shot", "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads (2-core CPU shared with other "
        f"jobs), torch {torch.__version__}. Total wall time {seconds / 60:.1f} min.  ",
        f"Protocol: tf_efficientnet_lite0 ({args.weights} ImageNet weights), {args.image_size} px, seed {args.seed}. "
        "Each model is fitted once on the seen types (10% of them held out for its threshold, target false-alarm "
        "rate 0.01); k = the normal images of the unseen type (from its train split, seeded) given to "
        "`adapt_prototypes` (pmad: added prototypes; patchcore: added bank patches; musc: none, it is zero-shot) "
        "and, with target 0, to the new threshold: the highest of the k normal scores, each scored by the model "
        "adapted on the other k - 1 (`omniad.adaptation.adapt`; musc: the k scored against each other). FAR "
        "seen-thr: share "
        "of the unseen type's test normals above the seen types' threshold; FAR after / caught after: share of its "
        "test normals / defective images above the threshold recalibrated on the k normals. musc scores each "
        "type's test set against itself (mutual scoring), "
        + (f"in seeded random lots of at most {args.musc_lot} images. " if args.musc_lot else "in one lot. ")
        + "Real-data subsets: at most "
        f"{args.max_train or 'all'} training images per seen type, {args.max_test_per_type or 'all'} test images "
        "per defect type (seeded).", "",
        "| train -> test | unseen type | method | k | I-AUROC | P-AUROC | AU-PRO | FAR seen-thr | FAR after | "
        "caught after | test normal+defective | fit s | score s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="root of the real industrial set")
    parser.add_argument("--method", action="append", help="detectors (default: pmad, patchcore, uniad if known)")
    parser.add_argument("--param", action="append", default=[], metavar="METHOD.KEY=VALUE",
                        help="override a method parameter (YAML value), e.g. pmad.epochs=20; repeatable")
    parser.add_argument("--pmad-variants", default="entropy,cross_entropy,cross_entropy*prototype,prototype",
                        help="PMAD scores to report, all from one fit and one scoring pass (see PMAD.score_variants)")
    parser.add_argument("--settings", default="real,synthetic,unified",
                        help="which settings to run: real, synthetic, unified, and new-type (a type never seen: "
                             "zero-shot, few-shot k = 0, 1, 4, 8 and recalibration; its own table, --new-type-out)")
    parser.add_argument("--max-train", type=int, default=None, help="normal training images per category")
    parser.add_argument("--max-test-per-type", type=int, default=None,
                        help="test images per category and defect type (normal 'good' counts as a type)")
    parser.add_argument("--synthetic-train", type=int, default=40, help="synthetic training images per type")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--weights", default="offline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/cross_class.md")
    parser.add_argument("--new-type-out", default="benchmarks/results/cross_class_new_type.md")
    parser.add_argument("--shots", type=int, nargs="+", default=list(SHOTS),
                        help="new-type: the k values (normal images of the unseen type)")
    parser.add_argument("--new-type-methods", nargs="+", choices=list(NEW_TYPE_METHODS),
                        help="new-type: the methods (default: all)")
    parser.add_argument("--new-type-splits", nargs="+", choices=["real", "synthetic"], default=["real", "synthetic"])
    parser.add_argument("--musc-lot", type=int, default=None,
                        help="new-type: musc scores each unseen type's test set in seeded lots of at most N images "
                             "(default: the whole set at once)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if min(args.shots) < 0 or (args.musc_lot is not None and args.musc_lot < 2):
        parser.error("--shots must be >= 0 and --musc-lot >= 2")

    known = list_detectors()
    methods = args.method or [m for m in ("pmad", "patchcore", "uniad") if m in known]
    overrides: dict[str, dict] = {}
    for key, value in parse_params(args.param).items():
        method, _, name = key.partition(".")
        overrides.setdefault(method, {})[name] = value
    variants = [s.strip() for s in args.pmad_variants.split(",") if s.strip()]
    settings = {s.strip() for s in args.settings.split(",")}
    started_all = time.perf_counter()

    # (setting, split, root, train categories, test categories, methods)
    jobs: list[tuple[str, str, Path, list[str], list[str], list[str]]] = []
    if "real" in settings or "unified" in settings:
        if not Path(args.data).is_dir():
            print(f"real data not found at {args.data}", file=sys.stderr)
            return 2
    if "real" in settings:
        for split in REAL_SPLITS:
            jobs.append(("cross-class", split, Path(args.data), *cross_class_split(split), methods))
    if "unified" in settings:
        both = ["magnetic_tile", "kolektor"]
        jobs.append(("unified", "both -> both", Path(args.data), both, both, ["pmad"]))
    tmp = tempfile.TemporaryDirectory(prefix="omniad-synthetic-")
    if "synthetic" in settings:
        root = make_synthetic_dataset(Path(tmp.name), n_train=args.synthetic_train, n_test_good=8, n_test_defect=8,
                                      image_size=args.image_size, seed=args.seed)
        for split in SYNTHETIC_SPLITS:
            jobs.append(("synthetic cross-class", split, root, *cross_class_split(split), methods))

    if "new-type" in settings:
        new_jobs = []
        if "real" in args.new_type_splits:
            new_jobs += [("new type", split, Path(args.data), *cross_class_split(split), []) for split in REAL_SPLITS]
        if "synthetic" in args.new_type_splits:
            synthetic = make_synthetic_dataset(Path(tmp.name) / "new-type", n_train=args.synthetic_train,
                                               n_test_good=8, n_test_defect=8, image_size=args.image_size,
                                               seed=args.seed)
            new_jobs.append(("new type", SYNTHETIC_SPLITS[0], synthetic, *cross_class_split(SYNTHETIC_SPLITS[0]),
                             []))
        rows = run_new_type(args, new_jobs)
        publish(new_type_table(args, argv, rows, time.perf_counter() - started_all), args.new_type_out)
    if not jobs:
        tmp.cleanup()
        return 0

    lines: list[str] = []
    for setting, split, root, train_cats, test_cats, job_methods in jobs:
        real = root == Path(args.data)
        train = MVTecDataset(root, categories=train_cats, split="train", image_size=args.image_size)
        test = MVTecDataset(root, categories=test_cats, split="test", image_size=args.image_size)
        if real:
            train = subsample(train, args.max_train, False, args.seed)
            test = subsample(test, args.max_test_per_type, True, args.seed)
        print(f"{setting} {split}: {len(train)} train / {len(test)} test images", file=sys.stderr, flush=True)
        for method in job_methods:
            params = {**CPU_SETTINGS.get(method, {}), **overrides.get(method, {})}
            params.update(weights=args.weights, image_size=args.image_size, seed=args.seed, progress=False,
                          calibration_fraction=0.0)
            results = run(method, params, train, test, variants if method == "pmad" else None)
            hidden = ("weights", "image_size", "seed", "progress", "calibration_fraction")
            shown = {k: v for k, v in params.items() if k not in hidden}
            for label, report, fit_s, eval_s in results:
                for row in [*test_cats, "mean"] if len(test_cats) > 1 else test_cats:
                    r = report.rows[row]
                    values = " | ".join(f"{r[key]:.3f}" for key, _ in METRICS)
                    counts = f"{len(train)} / {r['n_normal']}+{r['n_defective']}"
                    lines.append(f"| {setting} | {split} | {label} | {row} | {values} | {counts} | "
                                 f"{fit_s:.0f} | {eval_s:.0f} | `{shown}` |")
    total = time.perf_counter() - started_all
    tmp.cleanup()

    header = " | ".join(name for _, name in METRICS)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    text = [
        "# Cross-class benchmark (one-for-all)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads (2-core CPU shared with other "
        f"jobs), torch {torch.__version__}. Total wall time {total / 60:.1f} min.  ",
        f"Protocol: backbone tf_efficientnet_lite0 ({args.weights} ImageNet weights), {args.image_size} px, "
        "maps Gaussian sigma 4, image score per each detector's pooling; metrics per unseen test type; no "
        "threshold calibration (calibration_fraction 0: every training image is trained on); seed "
        f"{args.seed}. Real-data subsets: at most {args.max_train or 'all'} training images per type and "
        f"{args.max_test_per_type or 'all'} test images per type and defect type (seeded).",
        "",
        f"| setting | train -> test | method | test type | {header} | train / test normal+defective | fit s | "
        "eval s | CPU settings |",
        "|---|---|---|---|" + "---|" * len(METRICS) + "---|---|---|---|",
        *lines,
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(text))
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
