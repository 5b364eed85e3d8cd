"""omniad against the peer (anomalib) in one run, same machine and data: fit time with 1 and N processes, predict
throughput from image files on disk to decisions on every path (the default: ``load_model(runtime="auto")`` on the
torch bundle, what ``omniad predict`` does; torch, onnxruntime, OpenVINO f32, OpenVINO bf16; INT8 by
``omniad.quantize``), peak memory of each step, image AUROC of each path's own scores, the share of a path's time
per image that reading the files takes, and image AUROC and AU-PRO per type, for PaDiM and PatchCore (1% coreset).

Each fit and each predict runs in a process of its own, started by this script, and reports its own peak resident
memory (VmHWM), so that the memory is that step's alone. omniad side: ``omniad fit`` per type (as the peer's per-type
models; under ``torchrun`` for N processes), ``evaluate`` for the metrics, ``omniad.predict`` (what ``omniad
predict`` runs) on the type's test files after one warm-up batch. Peer side: ``benchmarks/peer_anomalib.py`` run by
``--peer-python`` (a venv where ``pip install anomalib`` was run), with omniad's offline weights for the same
backbone. Both sides: tf_efficientnet_lite0, 256 px, batch 16.

    python benchmarks/speed.py --categories kolektor --processes 1 2 --peer-python /tmp/peer/bin/python \\
        --out benchmarks/results/speed.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import DEFAULT_DATA, peak_rss_mib, publish

from omniad import evaluate
from omniad.data import MVTecDataset
from omniad.export import ExportedDetector, export_detector, load_model
from omniad.fastpath import load_model as load_fast_path
from omniad.metrics.ranking import auroc
from omniad.quantize import QuantizationError, quantize_model
from omniad.weights import offline_cache_path

SETTINGS = {  # label -> (method, parameters beyond the common ones); PatchCore also with the measured better score
    "PaDiM": ("padim", {}),
    "PatchCore, paper's score": ("patchcore", {}),
    "PatchCore, top-1% score": ("patchcore", {"image_pooling": "top1"}),
}
PATHS = {  # predict path -> (model file in the fit folder, how it is loaded: a precision, or "auto")
    "torch": ("model", "f32"),
    "default (omniad predict: auto runtime)": ("model", "auto"),
    "onnxruntime": ("model.onnx", "f32"),
    "OpenVINO f32": ("model.xml", "f32"),
    "OpenVINO bf16": ("model.xml", "bf16"),
    "OpenVINO INT8 (omniad quantize)": ("model.int8.xml", "f32"),
}


def run_child(command: list[str]) -> list[dict]:
    """Run ``command`` (this script in a child mode, perhaps under torchrun); the JSON lines it printed."""
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def child_fit(method: str, options: list[str], category: str, data: str, out: str) -> None:
    """In a process of its own (one rank of several under torchrun): fit on the type's training images and save;
    print the fit time and this process's peak memory as one JSON line."""
    from omniad import create_detector
    from omniad.distributed import init_from_env, is_main

    init_from_env("cpu")
    params = {"coreset_ratio": 0.01} if method == "patchcore" else {}
    params.update(json.loads(options) if options else {})
    train = MVTecDataset(data, categories=[category], split="train", image_size=256)
    started = time.perf_counter()
    detector = create_detector(method, weights="offline", image_size=256, batch_size=16, progress=False,
                              **params).fit(train)
    seconds = time.perf_counter() - started
    if is_main():
        detector.save(out)
    print(json.dumps({"fit_seconds": seconds, "memory": peak_rss_mib()}))


def child_predict(model: str, precision: str, files_list: str) -> None:
    """In a process of its own: load ``model``, predict the listed files once to warm up and once timed, then read
    them alone (one thread, as a reader does) for the share of the time that decoding takes; print the
    throughput, the read time and the scores as one JSON line."""
    from omniad import predict
    from omniad.data.images import read_image

    files = json.loads(Path(files_list).read_text())
    started = time.perf_counter()
    if precision == "auto":
        detector = load_fast_path(model, runtime="auto")
    else:
        detector = ExportedDetector.load(model, precision=precision) if precision != "f32" else load_model(model)
    load_seconds = time.perf_counter() - started
    predict(detector, files[:16], progress=False)
    started = time.perf_counter()
    result = predict(detector, files, progress=False)
    seconds = time.perf_counter() - started
    started = time.perf_counter()
    for file in files:
        read_image(file, getattr(detector, "read_size", detector.image_size),  # as predict reads
                   dtype=getattr(detector, "read_dtype", torch.float32))
    read_seconds = time.perf_counter() - started
    print(json.dumps({"images_per_second": len(files) / seconds, "memory": peak_rss_mib(),
                      "load_seconds": load_seconds, "read_ms": 1000 * read_seconds / len(files),
                      "runtime": result.runtime, "scores": [r.score for r in result.results],
                      "decisions": [bool(r.anomalous) for r in result.results]}))


def fit_command(method: str, params: dict, category: str, data: str, out: str, processes: int) -> list[str]:
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    return launcher + [__file__, "--child-fit", method, "--params", json.dumps(params), "--category", category,
                       "--data", data, "--model-out", out]


def omniad_rows(category: str, args: argparse.Namespace, tmp: str) -> list[dict]:
    test = MVTecDataset(args.data, categories=[category], split="test", image_size=256)
    files_list = Path(tmp) / "files.json"
    files_list.write_text(json.dumps([str(r.path) for r in test.samples]))
    rows = []
    for label, (method, options) in SETTINGS.items():
        if label not in args.settings:
            continue
        fitted = {}
        for processes in args.processes:
            folder = Path(tmp) / f"{method}-{len(rows)}-{processes}"
            ranks = run_child(fit_command(method, options, category, args.data, str(folder / "model"), processes))
            fitted[processes] = (folder, max(r["fit_seconds"] for r in ranks), max(r["memory"] for r in ranks))
        folder, fit_seconds, fit_memory = fitted[args.processes[0]]
        detector = load_model(folder / "model")
        report = evaluate(detector, test, progress=False)
        quality = [(report.rows[category]["image_auroc"], report.rows[category]["pixel_aupro"])]
        for seed in range(1, args.seeds):  # quality only: the hold-out split and the coreset's start move with it
            other = Path(tmp) / f"{method}-{len(rows)}-seed{seed}"
            run_child(fit_command(method, {**options, "seed": seed}, category, args.data, str(other / "model"), 1))
            seeded = evaluate(load_model(other / "model"), test, progress=False).rows[category]
            quality.append((seeded["image_auroc"], seeded["pixel_aupro"]))
        images = torch.stack([sample.image for sample in test]) if args.processes[1:] else None
        for other in args.processes[1:]:  # the same model from N processes? the largest image-score difference
            difference = load_model(fitted[other][0] / "model").score(images).image_scores - detector.score(
                images).image_scores
            fitted[other] += (float(difference.abs().max()),)
        export_detector(detector, folder / "model.onnx", format="onnx")
        export_detector(detector, folder / "model.xml", format="openvino")
        started = time.perf_counter()
        load_fast_path(folder / "model", runtime="auto")  # the default path's one-time build, cached beside it
        build_seconds = time.perf_counter() - started
        train = MVTecDataset(args.data, categories=[category], split="train", image_size=256)
        try:
            int8 = quantize_model(detector, train, folder / "model.int8.xml")
        except QuantizationError as err:
            int8 = err
        labels = np.array([r.label for r in test.samples])
        reference = None
        for path, (file, precision) in PATHS.items():
            if file == "model.int8.xml" and isinstance(int8, QuantizationError):
                rows.append({"tool": "omniad", "setting": label, "path": path, "category": category,
                             "refused": str(int8)})
                print(rows[-1], flush=True)
                continue
            measured, = run_child([sys.executable, __file__, "--child-predict", str(folder / file),
                                   "--precision", precision, "--files-list", str(files_list)])
            scores, decisions = np.array(measured["scores"]), np.array(measured["decisions"])
            if reference is None:
                reference = (scores, decisions)
            row = {"tool": "omniad", "setting": label, "path": path, "category": category,
                   "fit_seconds": fit_seconds, "fit_memory": fit_memory,
                   "images_per_second": measured["images_per_second"], "predict_memory": measured["memory"],
                   "read_ms": measured["read_ms"], "load_seconds": measured["load_seconds"],
                   "runtime": measured["runtime"], "path_auroc": auroc(labels, scores),
                   "quality": quality,
                   "score_change": float(np.max(np.abs(scores - reference[0]) / np.abs(reference[0]).max())),
                   "same_decisions": int((decisions == reference[1]).sum()), "n": len(decisions),
                   "scaling": {p: fitted[p][1:] for p in args.processes[1:]}}
            if precision == "auto":
                row["build_seconds"] = build_seconds
            if file == "model.int8.xml":
                row["int8"] = int8.to_dict()
            rows.append(row)
            print({k: v for k, v in row.items() if k not in ("int8",)}, flush=True)
    return rows


def peer_rows(category: str, args: argparse.Namespace) -> list[dict]:
    rows = []
    for method, label in (("padim", "PaDiM"), ("patchcore", "PatchCore, paper's score")):
        if label not in args.settings:
            continue
        runs = [run_child(
            [args.peer_python, str(Path(__file__).with_name("peer_anomalib.py")), "--data", args.data,
             "--category", category, "--method", method, "--weights", str(offline_cache_path("tf_efficientnet_lite0")),
             "--seed", str(seed)])[0] for seed in range(args.seeds)]
        result = runs[0]  # speed and memory from the first seed's run
        rows.append({"tool": "anomalib", "setting": label, "path": "engine.predict(data_path)", **result,
                     "quality": [(r["image_auroc"], r["aupro"]) for r in runs],
                     "fit_memory": result["memory"], "predict_memory": None})
        print(rows[-1], flush=True)
    return rows


def sample_training_sets(data: Path, categories: list[str], n: int, tmp: Path) -> tuple[str, dict[str, str]]:
    """An MVTec-layout copy of ``data`` (symlinks) whose types keep ``n`` training images drawn with seed 0 and their
    whole test set, so that both tools fit on the same sample. Returns the copy's root and, per type, "n of N"."""
    root, sampled = tmp / "sampled-data", {}
    for category in categories:
        source, target = data / category, root / category
        for entry in source.iterdir():
            if entry.name != "train":
                target.mkdir(parents=True, exist_ok=True)
                (target / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
        files = sorted((source / "train" / "good").iterdir())
        keep = sorted(np.random.default_rng(0).permutation(len(files))[:n])
        (target / "train" / "good").mkdir(parents=True)
        for i in keep:
            (target / "train" / "good" / files[i].name).symlink_to(files[i].resolve())
        sampled[category] = f"{len(keep)} of {len(files)}"
    return str(root), sampled


def spread(values: list[float]) -> str:
    """Percentages: one value, or the mean and range of several."""
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * np.mean(values):.1f} ({100 * min(values):.1f}-{100 * max(values):.1f})"


def mib(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--categories", nargs="+", default=["kolektor"])
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2],
                        help="process counts to fit with (torchrun for more than 1); the first one's model is "
                             "evaluated and exported")
    parser.add_argument("--max-train", type=int, default=None,
                        help="train both tools on the same seeded sample of this many training images per type "
                             "(a type with more images would make the peer's coreset search run for most of an hour)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="image AUROC and AU-PRO over seeds 0..N-1 on both sides (mean and range); the speed "
                             "and memory columns are seed 0's")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS),
                        help="omniad settings to run (the peer runs PaDiM and the paper's PatchCore score)")
    parser.add_argument("--peer-python", help="python of an environment with anomalib (the peer is skipped without)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child-predict", help=argparse.SUPPRESS)
    parser.add_argument("--child-fit", help=argparse.SUPPRESS)
    parser.add_argument("--params", help=argparse.SUPPRESS)
    parser.add_argument("--category", help=argparse.SUPPRESS)
    parser.add_argument("--model-out", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="f32", help=argparse.SUPPRESS)
    parser.add_argument("--files-list", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.seeds < 1 or (args.max_train is not None and args.max_train < 1):
        parser.error(f"--seeds and --max-train must be at least 1, got {args.seeds} and {args.max_train}")
    if args.child_predict:
        return child_predict(args.child_predict, args.precision, args.files_list)
    if args.child_fit:
        return child_fit(args.child_fit, args.params, args.category, args.data, args.model_out)
    load_before = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sampled = {}
        if args.max_train:
            args.data, sampled = sample_training_sets(Path(args.data), args.categories, args.max_train, Path(tmp))
        for category in args.categories:
            rows += omniad_rows(category, args, tmp)
            if args.peer_python:
                rows += peer_rows(category, args)
    load_after = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    seeded = f", mean (min-max) of seeds 0-{args.seeds - 1}" if args.seeds > 1 else ""
    lines = [
        "# omniad vs anomalib: one run, same machine, same data, per type",
        "",
        f"tf_efficientnet_lite0 with omniad's offline ImageNet weights on both sides, 256 px, batch 16, PaDiM (stages "
        f"1-3, 100 features) and PatchCore (stages 2-3, 1% coreset). {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, python {sys.version.split()[0]}; load average "
        f"before {load_before}, after {load_after}; {time.perf_counter() - started:.0f} s in all. Predict = from "
        "image files on disk to decisions (omniad: `omniad.predict`, what `omniad predict` runs, after one warm-up "
        "batch; anomalib: `Engine.predict(data_path=...)`). Every fit and predict runs in a process of its own; "
        "memory = its peak resident set (MiB; the peer's fit and predict share one process). Score change = the "
        "largest score difference to the torch path, relative to the largest score. omniad holds 10% of the "
        "training images out for its threshold; anomalib trains on all."
        + "".join(f" {c}: both tools train on {n} training images, drawn with seed 0." for c, n in sampled.items()),
        "",
        "Read ms = `read_image` of each test file at the model's size (JPEG draft decoding, the default; uint8 for "
        "an exported graph, as predict reads for it), one thread, after the predict run; in brackets its share of "
        "the path's time per image (one reader thread's time over the path's wall time per image). Path AUROC = image "
        "AUROC of the path's own scores (in brackets: against the torch path). The AUROC and AU-PRO columns after "
        "it are `evaluate` on the torch model.",
        "",
        "| type | tool | setting | predict path | runtime | fit s | fit MiB | predict img/s | x peer | predict MiB | "
        f"read ms (share) | score change | same decisions | path AUROC | image AUROC{seeded} | AU-PRO{seeded} |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    peer = {(r["category"], r["setting"]): r["images_per_second"] for r in rows if r["tool"] == "anomalib"}
    torch_auroc = {(r["category"], r["setting"]): r["path_auroc"] for r in rows
                   if r["tool"] == "omniad" and r["path"] == "torch"}
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['category']} | {r['tool']} | {r['setting']} | {r['path']} | refused: "
                         f"{r['refused']} |" + " |" * 13)
            continue
        change = f"{r['score_change']:.1e}" if "score_change" in r else ""
        same = f"{r['same_decisions']}/{r['n']}" if "same_decisions" in r else ""
        key = (r["category"], r["setting"])
        ratio = f"{r['images_per_second'] / peer[key]:.1f}x" if r["tool"] == "omniad" and key in peer else ""
        read = (f"{r['read_ms']:.1f} ({100 * r['read_ms'] * r['images_per_second'] / 1000:.0f}%)"
                if "read_ms" in r else "")
        path_auroc = (f"{100 * r['path_auroc']:.2f} ({100 * (r['path_auroc'] - torch_auroc[key]):+.2f})"
                      if "path_auroc" in r else "")
        lines.append(f"| {r['category']} | {r['tool']} | {r['setting']} | {r['path']} | {r.get('runtime', '')} | "
                     f"{r['fit_seconds']:.1f} | {mib(r['fit_memory'])} | {r['images_per_second']:.1f} | {ratio} | "
                     f"{mib(r['predict_memory'])} | {read} | {change} | {same} | {path_auroc} | "
                     f"{spread([q[0] for q in r['quality']])} | {spread([q[1] for q in r['quality']])} |")
    built = [r for r in rows if "build_seconds" in r]
    if built:
        lines += ["", "The default path's one-time build (export, parity check, cache beside the bundle), then its "
                  "load from the cache in the predict process: " + "; ".join(
                      f"{r['category']} {r['setting']}: {r['build_seconds']:.1f} s, then {r['load_seconds']:.1f} s"
                      for r in built) + "."]
    quantised = [r for r in rows if "int8" in r]
    if quantised:
        lines += ["", "INT8 (`omniad quantize`: NNCF over the OpenVINO graph, the backbone's weighted layers, "
                  "calibrated on the model's own held-out normal training images), as the quantiser reports it on "
                  "those images; the test-set change is in the table above:", "",
                  "| type | setting | held-out images | largest score change (of the f32 threshold) | mean | "
                  "decisions changed | threshold f32 -> INT8 | quantise s |", "|---|---|---:|---:|---:|---:|---|---:|"]
        for r in quantised:
            q = r["int8"]
            lines.append(f"| {r['category']} | {r['setting']} | {q['calibration_images']} | "
                         f"{100 * q['max_score_change']:.1f}% | {100 * q['mean_score_change']:.1f}% | "
                         f"{q['decisions_changed']} | {q['threshold_f32']:.4g} -> {q['threshold_int8']:.4g} | "
                         f"{q['seconds']:.1f} |")
    scaling = [(r["category"], r["setting"], p, v) for r in rows if r["tool"] == "omniad" and r["path"] == "torch"
               for p, v in r["scaling"].items()]
    if scaling:
        lines += ["", f"Fit with several processes (torchrun, gloo; against {args.processes[0]} process):", "",
                  "| type | setting | processes | fit s | fit MiB (largest rank) | largest image-score difference |",
                  "|---|---|---:|---:|---:|---:|"]
        for category, setting, processes, (seconds, memory, difference) in scaling:
            lines.append(f"| {category} | {setting} | {processes} | {seconds:.1f} | {memory:.0f} | {difference:.1e} |")
    publish(lines, args.out)


if __name__ == "__main__":
    main()
