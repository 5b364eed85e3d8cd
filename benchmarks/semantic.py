"""Semantic and multi-object novelty benchmark (the masked-KD / DEFEND paper's protocols, ACCV 2024).

    python benchmarks/semantic.py                                   # mkd, mkd+defend, patchcore, padim, uniad
    python benchmarks/semantic.py --methods patchcore,padim,uniad --param uniad.epochs=20
    python benchmarks/semantic.py --methods mkd,mkd+defend --param mkd.preset=cpu

Settings, every method under the same protocol (``omniad.data.novelty``), image-level AUROC of the whole test set
(the report's *mixed* row, the papers' figure):
  * Fashion-MNIST (../shared/data/semantic/fashion-mnist, IDX): uni-class (each class normal in turn) and the
    mean; the four 5-vs-5 multi-class splits; leave-one-out (each class held out in turn) and the mean;
  * or (``--labelled cifar10``) the CIFAR-10 training subset as class folders
    (../shared/data/semantic/cifar10-train-subset), split per class by the seed (``--test-per-class`` test
    images of each class, the rest for training), at 224 px;
  * COCO128 (../shared/data/multi-object/coco128): multi-object, normal = images containing a person; half of the
    normal images (seeded) are held out for the test with every image without a person.
CPU setting (explicit options): Fashion-MNIST's 28 x 28 images resized to ``--image-size`` (default 64), COCO's
photographs (about 640 x 480) to ``--coco-image-size`` (default 224, the paper's and the teacher's training size;
at 64 px a person is a few pixels), seeded caps of
``--max-train-per-class`` / ``--max-test-per-class`` images per class (default 100 / 50: the same 500 test
images in every Fashion-MNIST run), the backbone's offline EfficientNet-Lite ImageNet weights (no ViT weights
here; the paper's teacher is a ViT-B/16), no threshold calibration (every training image is trained on).
A method name ``X+defend`` is method ``X`` with ``defend=True``; ``--param X.key=value`` sets a parameter of
``X`` (and of ``X+defend``), ``--param X+defend.key=value`` of the variant only.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch.utils.data import Subset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # the package is not pip-installed here
from common import parse_params, pct, publish

from omniad import create_detector, list_detectors
from omniad.data.labelled import FASHION_MNIST_CLASSES, read_class_folders, read_coco, read_idx, split_per_class
from omniad.data.novelty import (
    SPLITS_5V5,
    NoveltyProtocol,
    NoveltyTestSet,
    build_protocol,
    multi_object,
    tell_normal_count,
)
from omniad.metrics import evaluate

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEFAULT_METHODS = "knn,mkd,mkd+defend,patchcore,padim,uniad"
# the benchmark's settings of the methods (the detectors' defaults stay the papers'): CPU budgets, and knn's unit-
# length features (DN2 compares raw ones; on CIFAR-10 the unit-length ones ranked 0.1-7.5 points higher, knn.py)
CPU_SETTINGS: dict[str, dict] = {
    "knn": {"normalize": True},
    "patchcore": {"coreset_ratio": 0.01},
    # a 4 x 4 token grid at 64 px (stride 32 gives 2 x 2, too few for the 3 x 3 neighbor mask); the preset's epochs
    "uniad": {"preset": "cpu", "feature_stride": 16},
    "mkd": {"preset": "cpu"},
}
# the paper's Fashion-MNIST AUROC (%), ViT-B/16 teacher (ImageNet-21k), 224 px, full data (Tables 2 and 4)
PAPER = {"uni-class mean": 94.4, "leave-one-out mean": 77.6}
# CIFAR-10, full data (50,000 / 10,000): the masked-KD/DEFEND paper (ViT-B/16) and, for 5-vs-5 {0-4}, UniAD
# (EfficientNet-B4), as the semantic data's README quotes them
PAPER_CIFAR = {"uni-class mean": "98.6", "5v5-first": "94.7 (UniAD 84.4)"}


def method_specs(text: str, overrides: dict[str, dict]) -> dict[str, tuple[str, dict]]:
    """``"mkd,mkd+defend"`` -> {label: (registered name, parameters)}; an unregistered method is an error."""
    known = list_detectors()
    specs: dict[str, tuple[str, dict]] = {}
    for label in (m.strip() for m in text.split(",") if m.strip()):
        name, _, variant = label.partition("+")
        if name not in known:
            raise SystemExit(f"method {name!r} (from {label!r}) is not registered; registered: {', '.join(known)}")
        if variant not in ("", "defend"):
            raise SystemExit(f"unknown variant {variant!r} in {label!r}; only '<method>+defend' exists")
        params = {**CPU_SETTINGS.get(name, {}), **overrides.get(name, {})}
        if variant:
            params.update(defend=True, **overrides.get(label, {}))
        specs[label] = (name, params)
    if not specs:
        raise SystemExit("no methods given")
    return specs


# methods whose features are one frozen-backbone pass that fit and score only read (no training, no hold-out here):
# each image's features are computed once per process and shared by every run of the seed (the runs' sets overlap)
SHARED_FEATURES = frozenset({"knn"})
_FEATURES: dict[tuple, torch.Tensor] = {}


def _paths_and_images(data) -> tuple[list[str], object]:
    """(file of each image, the labelled set's images as a dataset) of a protocol's train or test set."""
    if isinstance(data, NoveltyTestSet):
        return [data.images.paths[i] for i in data.index], Subset(data.images, data.index)
    return [data.dataset.paths[i] for i in data.indices], data


def shared_features(detector, data) -> torch.Tensor:
    """``detector.extract`` of ``data``'s images, computing only the images no earlier run of this process did."""
    key = (detector.backbone, detector.weights, str(detector.image_size), tuple(detector.resolved_params()["stages"]))
    paths, images = _paths_and_images(data)
    missing = [k for k, path in enumerate(paths) if (*key, path) not in _FEATURES]
    if missing:
        for k, row in zip(missing, detector.extract(Subset(images, missing)), strict=True):
            _FEATURES[(*key, paths[k])] = row
    return torch.stack([_FEATURES[(*key, path)] for path in paths])


def run_shared(name: str, params: dict, protocol: NoveltyProtocol) -> dict:
    """``run_one`` for ``SHARED_FEATURES`` methods: fit_features / score_cached on the shared features (the
    same scores as fit / score on the images); fit and score times exclude the shared feature extraction."""
    detector = create_detector(name, **params)
    train = shared_features(detector, protocol.train)
    started = time.perf_counter()
    detector.fit_features(train)
    fit_s = time.perf_counter() - started
    test = shared_features(detector, protocol.test)
    started = time.perf_counter()
    scores = detector.score_cached(test).image_scores.numpy()
    score_s = time.perf_counter() - started
    if not np.isfinite(scores).all():
        raise SystemExit(f"{name}: non-finite scores on {protocol.setting.describe()}")
    return {"auroc": float(roc_auc_score(protocol.test.targets, scores)), "fit_s": fit_s, "score_s": score_s,
            "n_train": len(protocol.train), "n_test": len(protocol.test), "backbone": detector.backbone,
            "weights": detector.backbone_.weights_source}


def run_one(name: str, params: dict, protocol: NoveltyProtocol) -> dict:
    """Fit on the protocol's normal images, evaluate its test set: AUROC (mixed row), times and throughputs."""
    if name in SHARED_FEATURES:
        return run_shared(name, params, protocol)
    detector = create_detector(name, **params)
    tell_normal_count(detector, protocol.setting, params)  # mkd's DEFEND: 2 x the normal classes' prototypes
    detector.fit(protocol.train)
    report = evaluate(detector, protocol.test, progress=False)
    n_train = len(protocol.train)
    return {
        "auroc": report.rows["mixed"]["image_auroc"],
        "fit_s": detector.fit_seconds_,
        "score_s": report.meta["score_seconds"],
        "n_train": n_train,
        "n_test": report.meta["n_images"],
        "backbone": report.meta.get("backbone"),
        "weights": report.meta.get("weights_source"),
    }


def build_jobs(args: argparse.Namespace, settings: list[str]) -> list[tuple[str, str, NoveltyProtocol]]:
    """(setting, row, protocol) of every run, in table order; seeded, so every process builds the same ones."""
    caps = dict(max_train_per_class=args.max_train_per_class, max_test_per_class=args.max_test_per_class,
                seed=args.seed)
    jobs: list[tuple[str, str, NoveltyProtocol]] = []
    if any(s != "multi-object" for s in settings):
        train, test = read_labelled_pair(args)
        classes = train.class_names
        if "uni-class" in settings:
            jobs += [("uni-class", c, build_protocol("uni-class", train, test, normal=[c], **caps)) for c in classes]
        if "multi-class" in settings:
            jobs += [("multi-class", s, build_protocol("multi-class", train, test, split=s, **caps))
                     for s in args.splits.split(",")]
        if "leave-one-out" in settings:
            jobs += [("leave-one-out", c, build_protocol("leave-one-out", train, test, held_out=c, **caps))
                     for c in classes]
    if "multi-object" in settings:
        coco = read_coco(args.coco, image_size=args.coco_image_size)
        jobs.append(("multi-object", "person", multi_object(coco, "person", seed=args.seed)))
    return jobs


def read_labelled_pair(args: argparse.Namespace):
    """The (train, test) sets of the non-COCO settings: Fashion-MNIST's own splits, or a seeded split of the
    CIFAR-10 class folders (``--test-per-class`` images of each class for the test, the rest for training)."""
    size = labelled_size(args)
    if args.labelled == "cifar10":
        return split_per_class(read_class_folders(args.cifar, "train", size), args.test_per_class, args.seed)
    return read_idx(args.fashion, "train", size), read_idx(args.fashion, "test", size)


def labelled_size(args: argparse.Namespace) -> int:
    """The side of the labelled set's images: ``--image-size``, else 64 for Fashion-MNIST's 28 px images and 224
    for CIFAR-10's photographs (the teacher's training size; the 32 px images upscaled)."""
    return args.image_size or (224 if args.labelled == "cifar10" else 64)


_WORKER_JOBS: list = []


def _init_worker(args: argparse.Namespace, settings: list[str]) -> None:
    torch.set_num_threads(args.threads)
    _WORKER_JOBS[:] = build_jobs(args, settings)


def image_size_of(setting: str, args: argparse.Namespace) -> int:
    """The side every method gets in ``setting``: COCO's photographs have their own."""
    return args.coco_image_size if setting == "multi-object" else labelled_size(args)


def _run_task(job: int, name: str, params: dict) -> dict:
    return run_one(name, params, _WORKER_JOBS[job][2])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated (default {DEFAULT_METHODS})")
    parser.add_argument("--param", action="append", default=[], metavar="METHOD.KEY=VALUE",
                        help="a method parameter (YAML value), e.g. uniad.epochs=20; repeatable")
    parser.add_argument("--settings", default="uni-class,multi-class,leave-one-out,multi-object")
    parser.add_argument("--splits", default=",".join(SPLITS_5V5),
                        help=f"the multi-class setting's 5-vs-5 splits (default all: {','.join(SPLITS_5V5)})")
    parser.add_argument("--fashion", default=str(SHARED / "semantic" / "fashion-mnist"))
    parser.add_argument("--coco", default=str(SHARED / "multi-object" / "coco128"))
    parser.add_argument("--labelled", choices=("fashion-mnist", "cifar10"), default="fashion-mnist",
                        help="the class-labelled set of the uni-class, multi-class and leave-one-out settings")
    parser.add_argument("--cifar", default=str(SHARED / "semantic" / "cifar10-train-subset"))
    parser.add_argument("--test-per-class", type=int, default=100,
                        help="CIFAR-10: images of each class held out for the test (seeded; default 100 of 600)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="the labelled set's side in pixels (default 64 for Fashion-MNIST, 224 for CIFAR-10)")
    parser.add_argument("--coco-image-size", type=int, default=224, help="COCO128's side in pixels (default 224)")
    parser.add_argument("--max-train-per-class", type=int, default=100)
    parser.add_argument("--max-test-per-class", type=int, default=50)
    parser.add_argument("--weights", default="offline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core CPU, 2 threads fight and run slower)")
    parser.add_argument("--processes", type=int, default=1,
                        help="runs in parallel worker processes, each with --threads threads (results do not "
                             "depend on it; times per run do)")
    parser.add_argument("--out", default="benchmarks/results/semantic.md")
    args = parser.parse_args(argv)
    if args.processes < 1 or args.threads < 1:
        parser.error("--processes and --threads must be at least 1")
    unknown = [s for s in args.splits.split(",") if s not in SPLITS_5V5]
    if unknown:
        parser.error(f"unknown --splits {unknown}; known: {', '.join(SPLITS_5V5)}")
    torch.set_num_threads(args.threads)

    overrides: dict[str, dict] = {}
    for key, value in parse_params(args.param).items():
        method, _, name = key.rpartition(".")
        overrides.setdefault(method, {})[name] = value
    specs = method_specs(args.methods, overrides)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    common = dict(weights=args.weights, seed=args.seed, progress=False, calibration_fraction=0.0)
    started_all, load_start = time.perf_counter(), os.getloadavg()

    jobs = build_jobs(args, settings)
    tasks = [(j, label) for j in range(len(jobs)) for label in specs]  # every (protocol, method) run
    done: dict[tuple[int, str], dict] = {}

    def params_of(job: int, label: str) -> dict:
        return {**specs[label][1], **common, "image_size": image_size_of(jobs[job][0], args)}

    def record(task: tuple[int, str], result: dict) -> None:
        done[task] = result
        setting, row, _ = jobs[task[0]]
        print(f"{setting} {row} {task[1]}: AUROC {result['auroc']:.3f}, fit {result['fit_s']:.0f} s "
              f"({result['n_train']} images), score {result['score_s']:.0f} s", file=sys.stderr, flush=True)

    if args.processes > 1:  # runs are independent: each worker builds the same seeded protocols once
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.processes, mp_context=context, initializer=_init_worker,
                                 initargs=(args, settings)) as pool:
            futures = {pool.submit(_run_task, j, specs[label][0], params_of(j, label)): (j, label)
                       for j, label in tasks}
            for future in as_completed(futures):
                record(futures[future], future.result())
    else:
        for j, label in tasks:
            record((j, label), run_one(specs[label][0], params_of(j, label), jobs[j][2]))
    results = {(*jobs[j][:2], label): done[j, label] for j, label in tasks}  # in table order
    total = time.perf_counter() - started_all

    labels = list(specs)
    head = "| " + " | ".join(labels) + " | paper (ViT-B) |"
    rule = "|---|" + "---:|" * (len(labels) + 1)

    cifar = args.labelled == "cifar10"
    paper_figures = PAPER_CIFAR if cifar else PAPER

    def table(setting: str, title: str, row_name) -> list[str]:
        rows = list(dict.fromkeys(r for s, r, _ in results if s == setting))
        if not rows:
            return []
        out = [f"## {title}", "", f"| {setting} {head}", rule]
        for row in rows:
            out.append(f"| {row_name(row)} | " + " | ".join(pct(results[setting, row, m]["auroc"]) for m in labels)
                       + f" | {paper_figures.get(row, '') if setting == 'multi-class' else ''} |")
        if setting in ("uni-class", "leave-one-out") and len(rows) > 1:
            means = [pct(float(np.mean([results[setting, r, m]["auroc"] for r in rows]))) for m in labels]
            paper = paper_figures.get(f"{setting} mean")
            out.append("| **mean** | " + " | ".join(means) + f" | {paper if paper else ''} |")
        sizes = sorted({(p.setting.n_train, p.setting.n_test_normal, p.setting.n_test_anomalous)
                        for s, _, p in jobs if s == setting})
        return out + ["", "Images per run (training; test normal + anomalous): "
                      + ", ".join(f"{a}; {b} + {c}" for a, b, c in sizes) + ".", ""]

    fashion = {} if cifar else dict(zip([str(k) for k in range(10)], FASHION_MNIST_CLASSES, strict=True))
    data_name = "CIFAR-10" if cifar else "Fashion-MNIST"
    split_note = (f"CIFAR-10 training subset (600 per class), split seeded by seed {args.seed}: "
                  f"{args.test_per_class} test images per class, the rest for training" if cifar else
                  "Fashion-MNIST test set: the same images in every run")
    split_text = {s: "{" + ",".join(map(str, v)) + "}" for s, v in SPLITS_5V5.items()}
    lines = [
        "# Semantic and multi-object novelty (image AUROC %, whole test set)",
        "",
        f"Command: `python {shlex.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])}`  ",
        f"Machine: {platform.machine()}, {args.processes} process(es) x {torch.get_num_threads()} torch threads "
        f"(2-core CPU), torch {torch.__version__}. Total wall time {total / 60:.1f} min; load average (1, 5, 15 min) "
        f"{'/'.join(f'{x:.1f}' for x in load_start)} at the start, "
        f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())} at the end.  ",
        f"CPU setting: {data_name} at {labelled_size(args)} px (upscaled), COCO128 at "
        f"{args.coco_image_size} px; at most {args.max_train_per_class} "
        f"training and {args.max_test_per_class} test images per class (seeded, seed {args.seed}; {split_note}), "
        "backbone "
        f"{next(iter(results.values()))['backbone'] if results else '?'} with offline EfficientNet-Lite ImageNet "
        "weights (no ViT weights here; the paper uses a ViT-B/16 teacher at 224 px on the full data, so its "
        "column is a reference, not a like-for-like figure). No threshold calibration. Method parameters: "
        + "; ".join(f"{label} `{params}`" for label, (_, params) in specs.items()) + ".",
        "",
        *table("uni-class", f"{data_name}, uni-class (one class normal; row = the normal class)",
               lambda r: f"{r} {fashion.get(r, '')}".strip()),
        *table("multi-class", f"{data_name}, multi-class unified (5 classes normal, trained together)",
               lambda r: f"{r} {split_text[r]}"),
        *table("leave-one-out", f"{data_name}, leave-one-out (row = the anomalous class; nine normal)",
               lambda r: f"{r} {fashion.get(r, '')}".strip()),
        *table("multi-object", "COCO128, multi-object (normal = contains a person; the paper's COCO figures use "
               "full COCO and are not comparable)", lambda r: r),
        "## Cost per method (all runs above)",
        "",
        "| method | runs | fit s | fit images/s | score s | score images/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label in labels:
        mine = [v for (_, _, m), v in results.items() if m == label]
        fit_s, score_s = sum(v["fit_s"] for v in mine), sum(v["score_s"] for v in mine)
        n_fit, n_score = sum(v["n_train"] for v in mine), sum(v["n_test"] for v in mine)
        lines.append(f"| {label} | {len(mine)} | {fit_s:.0f} | {n_fit / fit_s:.1f} | {score_s:.0f} | "
                     f"{n_score / score_s:.1f} |")
    lines += ["", "Fit s includes the backbone's feature extraction of the training images; score s is the time "
              "in `score` over the test images. Except for " + ", ".join(sorted(SHARED_FEATURES)) + ": each image's "
              "features are extracted once per process and shared by the runs, and its fit and score s exclude that "
              "extraction."]
    publish(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
