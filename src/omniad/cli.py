"""The ``omniad`` command line. Thin: every command calls the same functions a Python user calls.

    omniad fit      --data ROOT --method NAME [method options] --out MODEL
    omniad eval     --model MODEL --data ROOT [--out REPORT_DIR]
    omniad run      --data ROOT --method NAME --out DIR        (fit + eval + report, any setting)
    omniad predict  --model MODEL FILES_OR_FOLDERS --out DIR   (exit status 1: some files could not be read)
    omniad export   --model MODEL --format onnx|openvino --out FILE
    omniad serve    --model MODEL [--host 127.0.0.1 --port 8000]  (HTTP service and page; needs omniad[serve])
    omniad calibrate --model MODEL --normals DIR [--target-far F] [--out MODEL2]   (threshold for a new type)
    omniad adapt    --model MODEL --normals DIR --out MODEL2 [--target-far F]     (few-shot: add its normals)
    omniad list
    omniad demo     [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import yaml

# `omniad fit` / `omniad run` without --method: the one-threshold model that measured best on the real pair
# (benchmarks/results/one-threshold.md: CADA over PaDiM, mixed image AUROC 93.3 against 89.2-90.6 for the other
# rows, false alarms per type 2.0% / 1.6% at a 1% target), with its regressor at the CPU setting measured (300
# SGD iterations; the paper's 5,000 with --iterations 5000). `--method cada` alone keeps the paper's base.
DEFAULT_METHOD = "cada"
DEFAULT_RECIPE = {"base": "padim", "iterations": 300}
DEMO_METHOD = "patchcore"  # the demo's: one fit of a few seconds
# omniad.fastpath.RUNTIMES, spelt out so that parsing the command line does not import torch (a test checks them)
RUNTIMES = ("auto", "openvino", "onnxruntime", "torch")
RUNTIME_HELP = ("what scores a model folder: auto (default: the first of OpenVINO, onnxruntime that is installed and "
                "whose exported graph reproduces the torch scores; the graph is built once and cached in "
                "<model>.fast/), openvino, onnxruntime, or torch; the output states the choice")
# omniad.export.PRECISIONS, spelt out for the same reason
PRECISIONS = ("f32", "bf16", "f16")
PRECISION_HELP = ("OpenVINO's inference precision for the exported graph: f32 (default: the scores checked against "
                  "the torch model), or bf16 / f16, faster where the CPU has them, with scores moved (measured: up "
                  "to 1.6-3.6%% of the largest score in bf16, benchmarks/results/speed-fastpath.md); runs on "
                  "OpenVINO only")
DRAFT_HELP = ("decode a JPEG at least twice the model's input size on both sides at 1/2, 1/4 or 1/8 scale "
              "(libjpeg's DCT scaling) before the usual resize (default: on, in training and prediction alike); "
              "--no-draft: full decoding, bit-identical pre-processing")


# ------------------------------------------------------------------ method options from the detector's signature
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def parse_value(text: str) -> Any:
    """A command-line value as YAML (``true``, ``[1, 2]``, ``null``), except that numbers YAML 1.1 leaves as
    strings (``1e-4``, ``5E3``) are numbers: ``--lr 1e-4`` must not reach the optimiser as text."""
    value = yaml.safe_load(text)
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    return value


def add_method_options(parser: argparse.ArgumentParser, method: str) -> list[str]:
    """Add one ``--option`` per hyper-parameter of ``method``, typed by its default, documented by its docstring."""
    from omniad.registry import detector_class

    cls = detector_class(method)
    group = parser.add_argument_group(f"options of method {method!r} (defaults = the paper's)")
    helps, defaults = cls.param_help(), cls.param_defaults()
    for name, default in defaults.items():
        flag = "--" + name.replace("_", "-")
        text = f"{helps.get(name, '')} (default: {default!r})".replace("%", "%%")  # argparse formats help
        if isinstance(default, bool):
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif isinstance(default, (tuple, list)):
            kind = type(default[0]) if default else str
            kind = parse_value if kind is bool else kind  # bool("False") is True
            group.add_argument(flag, dest=name, nargs="+", type=kind, default=None, help=text)
        elif isinstance(default, (int, float, str)):
            group.add_argument(flag, dest=name, type=type(default), default=None, help=text)
        else:
            group.add_argument(flag, dest=name, type=parse_value, default=None, help=text + " [YAML value]")
    return list(defaults)


def method_params(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """Parameters given on the command line (or in --config), to pass to ``create_detector``."""
    params: dict[str, Any] = {}
    if getattr(args, "config", None):
        with open(args.config) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{args.config}: a config file must hold a mapping of parameter: value")
        unknown = sorted(set(loaded) - set(names))
        if unknown:
            raise ValueError(f"{args.config}: unknown parameters {unknown}; known: {', '.join(names)}")
        params.update(loaded)
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            params[name] = tuple(value) if isinstance(value, list) else value
    return {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}


# ------------------------------------------------------------------ data options
def _categories(text: str | None) -> list[str] | None:
    return [c.strip() for c in text.split(",") if c.strip()] if text else None


def add_data_options(parser: argparse.ArgumentParser, train: bool, test: bool) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data", action="append", required=True, metavar="ROOT",
        help="MVTec-style root (<category>/train/good, test/<type>, ground_truth/<type>); repeat for several roots",
    )
    if train:
        group.add_argument("--train-categories", "--categories", dest="train_categories", metavar="A,B",
                           help="categories to train on (comma-separated; default: all)")
    if test:
        group.add_argument("--test-categories", dest="test_categories", metavar="C,D",
                           help="categories to test on (default: the training categories, or all)")
    if train and test:
        group.add_argument("--cross-class", metavar="SPLIT",
                           help="a named cross-class split, e.g. 'magnetic_tile->kolektor' or "
                                "'mvtec:textures->objects' (sets both category lists)")
    group.add_argument("--draft", action=argparse.BooleanOptionalAction, default=True, help=DRAFT_HELP)
    add_novelty_options(parser)


def add_novelty_options(parser: argparse.ArgumentParser) -> None:
    """Labelled sets (class folders, MNIST IDX, COCO) and the semantic / multi-object novelty protocols."""
    from omniad.data.novelty import PROTOCOLS, SPLITS_5V5

    group = parser.add_argument_group("semantic and multi-object novelty (docs/datasets.md)")
    group.add_argument("--data-format", choices=("mvtec", "folders", "idx", "coco"), default="mvtec",
                       help="mvtec (default: defects, MVTec layout); folders (<root>/<split>/<class>/*.png); idx "
                            "(MNIST / Fashion-MNIST files); coco (annotations/instances.json + images/)")
    group.add_argument("--protocol", choices=PROTOCOLS,
                       help="novelty protocol (needed with --data-format folders/idx/coco)")
    group.add_argument("--normal-classes", "--normal-categories", dest="normal_classes", metavar="A,B",
                       help="normal classes (uni-class: one; multi-class) or object categories (multi-object)")
    group.add_argument("--split", choices=tuple(SPLITS_5V5), help="multi-class: a built-in 5-vs-5 split")
    group.add_argument("--held-out", metavar="C", help="leave-one-out: the anomalous class")
    group.add_argument("--max-train-per-class", type=int, metavar="N", default=100,
                       help="at most N training images per class, a seeded subsample for CPU runs (default 100; "
                            "0: every image); the report states it")
    group.add_argument("--max-test-per-class", type=int, metavar="N", default=50,
                       help="at most N test images per class, seeded (default 50; 0: every image)")
    group.add_argument("--test-per-class", type=int, metavar="N",
                       help="folders / idx without a test split: hold out N images of each class (seeded by "
                            "--subsample-seed) from the training split for the test")
    group.add_argument("--test-fraction", type=float, default=0.5,
                       help="coco: share of the normal images held out for the test (default 0.5)")
    group.add_argument("--subsample-seed", type=int, default=0, help="seed of the subsamples and hold-out (default 0)")


def _novelty(args: argparse.Namespace, image_size: int):
    """The novelty protocol the options ask for (None for MVTec-style data)."""
    if args.data_format == "mvtec":
        if args.protocol:
            raise ValueError("--protocol needs --data-format folders, idx or coco")
        return None
    if not args.protocol:
        raise ValueError(f"--data-format {args.data_format} needs --protocol (uni-class, multi-class, "
                         "leave-one-out or multi-object)")
    if len(args.data) != 1:
        raise ValueError(f"--data-format {args.data_format} reads one --data folder, got {len(args.data)}")
    from omniad.data.novelty import load_protocol

    return load_protocol(args.data_format, args.data[0], args.protocol, image_size,
                         normal=_categories(args.normal_classes), split=args.split, held_out=args.held_out,
                         max_train_per_class=args.max_train_per_class, max_test_per_class=args.max_test_per_class,
                         test_fraction=args.test_fraction, seed=args.subsample_seed,
                         test_per_class=args.test_per_class, draft=args.draft)


def _resolve_categories(args: argparse.Namespace) -> tuple[list[str] | None, list[str] | None]:
    train = _categories(getattr(args, "train_categories", None))
    test = _categories(getattr(args, "test_categories", None))
    if getattr(args, "cross_class", None):
        from omniad.data.protocols import cross_class_split

        train, test = cross_class_split(args.cross_class)
    return train, (test if test is not None else train)


def _dataset(roots: list[str], categories: list[str] | None, split: str, image_size: Any, draft: bool = True):
    from omniad.data import MVTecDataset

    return MVTecDataset(roots, categories=categories, split=split, image_size=image_size, draft=draft)


# ------------------------------------------------------------------ commands
def cmd_list(args: argparse.Namespace) -> int:
    from omniad.registry import detector_class, list_detectors

    for name in list_detectors():
        cls = detector_class(name)
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"{name:12s} {summary}")
        if args.verbose:
            for param, default in cls.param_defaults().items():
                print(f"    --{param.replace('_', '-'):24s} {default!r}")
    return 0


def _fit(args: argparse.Namespace, names: list[str]):
    from omniad.registry import create_detector

    params = method_params(args, names)
    if args.method is None:  # the default recipe; the options given win
        args.method = DEFAULT_METHOD
        params = {**DEFAULT_RECIPE, **params}
        print(f"method: {DEFAULT_METHOD} over {params['base']} (the default: the best one-threshold model measured; "
              "--method NAME for another)", file=sys.stderr)
    detector = create_detector(args.method, **params)
    novelty = _novelty(args, detector.image_size)
    if novelty is not None:
        from omniad.data.novelty import tell_normal_count

        train = novelty.train
        _print_skipped(novelty.skipped.get("train", []), "train")
        if tell_normal_count(detector, novelty.setting, params):
            print(f"{args.method}: n_normal_classes = {len(novelty.setting.normal)} (the protocol's normal classes)",
                  file=sys.stderr)
        print(f"fitting {args.method} on {len(train)} normal images; {novelty.setting.describe()}", file=sys.stderr)
    else:
        train_categories, _ = _resolve_categories(args)
        train = _dataset(args.data, train_categories, "train", detector.read_size, args.draft)
        _print_skipped(train.skipped, train.split)
        print(f"fitting {args.method} on {len(train)} normal images of {', '.join(train.categories)} "
              f"(unified: no category labels)", file=sys.stderr)
    detector.fit(train)
    print(f"fitted in {detector.fit_seconds_:.1f} s, peak memory {detector.fit_peak_memory_mb_:.0f} MB; "
          f"{_calibration_line(detector)}", file=sys.stderr)
    return detector


def _calibration_line(detector) -> str:
    calibration = getattr(detector, "calibration_", None)
    if calibration is None:
        return ("no calibrated threshold (calibration_fraction is 0, or too few training images to hold any out): "
                "decisions need a threshold (omniad predict --threshold)")
    groups = calibration.describe_groups()
    return f"calibrated {calibration.describe()}" + (f"\n{groups}" if groups else "")


def _print_skipped(skipped: list, split: str, shown: int = 20) -> None:
    """The entries of the ``split`` data folders the reader does not use (a dataset's ``skipped``), on stderr."""
    if not skipped:
        return
    print(f"{len(skipped)} entries of the {split} folders are not used:", file=sys.stderr)
    for entry in skipped[:shown]:
        print(f"  {entry.path}: {entry.reason}", file=sys.stderr)
    if len(skipped) > shown:
        print(f"  ... and {len(skipped) - shown} more (the dataset's .skipped lists them all)", file=sys.stderr)


def cmd_fit(args: argparse.Namespace, names: list[str]) -> int:
    detector = _fit(args, names)
    detector.save(args.out)
    print(f"saved model to {args.out}")
    return 0


def _evaluate_and_write(detector, args: argparse.Namespace, out: str | None) -> None:
    from omniad.metrics import evaluate

    novelty = _novelty(args, detector.image_size)
    if novelty is not None:
        test = novelty.test  # the same seeded split as at fit time
        _print_skipped(novelty.skipped.get("test", []), "test")
    else:
        _, test_categories = _resolve_categories(args)
        test = _dataset(args.data, test_categories, "test", getattr(detector, "read_size", detector.image_size),
                        args.draft)
        _print_skipped(test.skipped, test.split)
    report = evaluate(detector, test, progress=detector.progress)
    print(report.to_markdown())
    if out:
        report.save(out)
        print(f"report written to {out}/report.md and report.json", file=sys.stderr)


def cmd_eval(args: argparse.Namespace) -> int:
    from omniad.export import load_model

    detector = load_model(args.model, device=args.device)  # a bundle folder, or an exported .onnx / .xml file
    print(f"model {args.model} ({detector.name}): {_calibration_line(detector)}", file=sys.stderr)
    _evaluate_and_write(detector, args, args.out)
    return 0


def cmd_run(args: argparse.Namespace, names: list[str]) -> int:
    detector = _fit(args, names)
    out = Path(args.out)
    detector.save(out / "model")
    _evaluate_and_write(detector, args, str(out))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from omniad.fastpath import load_model
    from omniad.prediction import predict

    detector = load_model(args.model, device=args.device, runtime=args.runtime, precision=args.precision)
    result = predict(detector, args.inputs, args.out, overlays=args.overlays, threshold=args.threshold,
                     draft=args.draft)
    print(result.summary())
    if result.failed:
        print(f"omniad: {len(result.failed)} of {len(result.failed) + len(result.results)} input files could not "
              "be read (listed above); the others were scored", file=sys.stderr)
        return 1
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from omniad.export import export_detector
    from omniad.io import load_detector

    kind = args.format or ("openvino" if Path(args.out).suffix.lower() == ".xml" else "onnx")
    detector = load_detector(args.model, device=args.device)
    path = export_detector(detector, args.out, format=kind, opset=args.opset, verify=args.verify)
    files = [path] + ([path.with_suffix(".bin")] if kind == "openvino" else [])
    size = sum(f.stat().st_size for f in files) / 2**20
    checked = "scores checked against the torch model" if args.verify else "scores not checked (--no-verify)"
    print(f"exported {detector.name} to {path} ({size:.1f} MB; uint8 RGB (batch, {detector.image_size}, "
          f"{detector.image_size}, 3) in; {checked})")
    print(_calibration_line(detector))
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from omniad.io import load_detector
    from omniad.quantize import quantize_model

    detector = load_detector(args.model, device="cpu")
    train = _dataset(args.data, _resolve_categories(args)[0], "train", detector.read_size, args.draft)
    _print_skipped(train.skipped, train.split)
    print(quantize_model(detector, train, args.out, max_score_change=args.max_score_change).summary())
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from omniad.serve import create_app, load_model, require_serve_dependencies, run

    require_serve_dependencies()  # before the model loads: say what is missing at once
    detector = load_model(args.model, device=args.device, runtime=args.runtime, precision=args.precision)
    print(f"model {args.model} ({detector.name}): {_calibration_line(detector)}", file=sys.stderr)
    print(f"runtime: {getattr(detector, 'runtime_note', 'torch')}", file=sys.stderr)
    max_pixels = None if args.max_megapixels is None else int(args.max_megapixels * 1e6)
    app = create_app(detector, max_upload_bytes=int(args.max_upload_mb * 2**20), max_batch=args.max_batch,
                     max_pixels=max_pixels, draft=args.draft)
    print(f"serving on http://{args.host}:{args.port}/ (the page; POST /predict, GET /model, GET /health); "
          "Ctrl+C stops", file=sys.stderr)
    run(app, host=args.host, port=args.port, log_level=args.log_level, threads=args.threads)
    return 0


def _new_type(args: argparse.Namespace):
    """The saved model and the normal images of the new type (``--model``, ``--normals``)."""
    from omniad.adaptation import read_normals
    from omniad.io import load_detector

    detector = load_detector(args.model, device=args.device)
    normals, files = read_normals(args.normals, detector.image_size)
    return detector, normals, f"{len(files)} normal images in {args.normals}"


def cmd_calibrate(args: argparse.Namespace) -> int:
    from omniad.adaptation import recalibrate

    detector, normals, source = _new_type(args)
    before = _calibration_line(detector)
    recalibrate(detector, normals, args.target_far, f"recalibrated on {source}")
    out = args.out or args.model
    detector.save(out)  # atomic: the previous bundle stays whole until the new one is in place
    print(f"before: {before}\nafter:  {_calibration_line(detector)}\nsaved model to {out}")
    return 0


def cmd_adapt(args: argparse.Namespace) -> int:
    from omniad.adaptation import adapt

    detector, normals, source = _new_type(args)
    adapt(detector, normals, args.target_far, f"{source}, each scored by the model adapted on the others")
    detector.save(args.out)
    print(f"adapted {detector.name} to {source}; {_calibration_line(detector)}\nsaved model to {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from omniad.demo import run_demo

    run_demo(args.out, method=args.method, weights=args.weights, seed=args.seed)
    return 0


# ------------------------------------------------------------------ parser
def build_parser(command: str | None = None, method: str | None = None) -> tuple[argparse.ArgumentParser, list[str]]:
    """The full parser; the ``command`` (fit or run) being parsed gets the options of ``method``."""
    parser = argparse.ArgumentParser(prog="omniad", description="Unified visual anomaly detection: one model "
                                     "for every product type, one threshold, no type label.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    names: list[str] = []

    for name, helptext in (("fit", "train one model on normal images of every category at once"),
                              ("run", "fit, save, evaluate and write the report in one go")):
        p = sub.add_parser(name, help=helptext, description=helptext)
        p.add_argument("--method", default=None,
                       help=f"detector to train (see `omniad list`; default: {DEFAULT_METHOD} over "
                            f"{DEFAULT_RECIPE['base']}, {DEFAULT_RECIPE['iterations']} iterations); "
                            "`omniad fit --method NAME --help` lists that method's options")
        p.add_argument("--out", required=True, help="model folder to write (fit) or output folder (run)")
        p.add_argument("--config", help="YAML file of method parameters (command-line options win)")
        add_data_options(p, train=True, test=name == "run")
        if method is not None and name == command:
            names = add_method_options(p, method)

    p = sub.add_parser("eval", help="evaluate a saved model on the test split (per category, mean, mixed)")
    p.add_argument("--model", required=True, help="model folder written by `omniad fit`, or a file written by "
                   "`omniad export` (.onnx, .xml)")
    p.add_argument("--out", help="folder for report.json and report.md")
    p.add_argument("--device", help="override the model's device (auto, cpu, cuda)")
    add_data_options(p, train=False, test=True)

    p = sub.add_parser("predict", help="score images or folders; decisions, heatmap overlays, CSV/JSON")
    p.add_argument("--model", required=True,
                   help="model folder written by `omniad fit`, or a .onnx / OpenVINO .xml file from `omniad export`")
    p.add_argument("inputs", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--out", required=True, help="output folder for results.csv, results.json, overlays/")
    p.add_argument("--threshold", type=float,
                   help="decision threshold, overriding the model's calibrated one (the output says so)")
    p.add_argument("--overlays", action=argparse.BooleanOptionalAction, default=True,
                   help="write a heatmap overlay PNG per image, overlays/<path relative to the inputs' common "
                        "folder>.png, e.g. overlays/sub/x.jpg.png (default: on)")
    p.add_argument("--device", help="override the model's device (auto, cpu, cuda)")
    p.add_argument("--runtime", choices=RUNTIMES, default="auto", help=RUNTIME_HELP)
    p.add_argument("--precision", choices=PRECISIONS, default="f32", help=PRECISION_HELP)
    p.add_argument("--draft", action=argparse.BooleanOptionalAction, default=True, help=DRAFT_HELP)

    p = sub.add_parser("export", help="write a model's whole scoring path to one ONNX or OpenVINO file")
    p.add_argument("--model", required=True, help="model folder written by `omniad fit`")
    p.add_argument("--format", choices=("onnx", "openvino"),
                   help="onnx (needs omniad[export]) or openvino (needs omniad[openvino]) (default: openvino for an "
                        "--out ending in .xml, else onnx)")
    p.add_argument("--out", required=True, help="file to write: *.onnx, or *.xml for openvino (+ its .bin)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="check that the file gives the torch model's scores on probe images (default: on)")
    p.add_argument("--device", default="cpu", help="device the model is loaded on to be traced (default: cpu)")
    p = sub.add_parser("quantize", help="write an INT8 OpenVINO graph of a model, calibrated on its held-out normals")
    p.add_argument("--model", required=True, help="model folder written by `omniad fit`")
    p.add_argument("--out", required=True, help="the .xml to write (+ its .bin)")
    # default: omniad.quantize.DEFAULT_MAX_SCORE_CHANGE (a test checks)
    p.add_argument("--max-score-change", type=float, default=0.25,
                   help="refuse the INT8 graph when a held-out normal image's score moves by more than this share "
                        "of the float32 threshold (default 0.25)")
    add_data_options(p, train=True, test=False)

    p = sub.add_parser("serve", help="serve a model over HTTP: POST /predict, GET /model, GET /health, a page at /")
    p.add_argument("--model", required=True, help="model folder written by `omniad fit`")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--device", help="override the model's device (auto, cpu, cuda)")
    p.add_argument("--runtime", choices=RUNTIMES, default="auto", help=RUNTIME_HELP)
    p.add_argument("--precision", choices=PRECISIONS, default="f32", help=PRECISION_HELP)
    p.add_argument("--draft", action=argparse.BooleanOptionalAction, default=True, help=DRAFT_HELP)
    p.add_argument("--max-upload-mb", type=float, default=32.0,
                   help="largest request body in MiB; bigger uploads get 413 (default 32)")
    p.add_argument("--max-batch", type=int, default=32, help="most images in one request (default 32)")
    p.add_argument("--max-megapixels", type=float,
                   help="largest image decoded, in millions of pixels; larger ones get 413 before decoding "
                        "(default: Pillow's decompression-bomb limit, PIL.Image.MAX_IMAGE_PIXELS, about 89)")
    p.add_argument("--threads", type=int,
                   help="torch threads of the server (default: one per core; 1 is often faster on a busy machine)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default info)")

    p = sub.add_parser("calibrate", help="re-set a saved model's threshold from normal images of a (new) type")
    p.add_argument("--model", required=True, help="model folder written by `omniad fit`")
    p.add_argument("--normals", required=True, help="folder of normal images of the type to inspect")
    p.add_argument("--target-far", type=float, help="false-alarm rate on those images (default: the model's); "
                   "k images resolve steps of 1/k, 0 = the highest of their scores")
    p.add_argument("--out", help="model folder to write (default: --model, replaced atomically)")
    p.add_argument("--device", help="override the model's device (auto, cpu, cuda)")
    p = sub.add_parser("adapt", help="few-shot: add normal images of a new type to a saved model's normal "
                       "references (pmad prototypes, patchcore bank); no retraining")
    p.add_argument("--model", required=True, help="model folder written by `omniad fit`")
    p.add_argument("--normals", required=True, help="folder of normal images of the new type")
    p.add_argument("--out", required=True, help="model folder to write the adapted model to")
    p.add_argument("--target-far", type=float, help="also set the threshold from the same images at this "
                   "false-alarm rate, each scored by the model adapted on the others (without it the adapted "
                   "model has no threshold)")
    p.add_argument("--device", help="override the model's device (auto, cpu, cuda)")

    p = sub.add_parser("list", help="list the registered detectors")
    p.add_argument("-v", "--verbose", action="store_true", help="also list every parameter with its default")

    p = sub.add_parser("demo", help="generate a synthetic multi-type set, fit one unified model, evaluate")
    p.add_argument("--out", default="omniad-demo", help="output folder (default: omniad-demo)")
    p.add_argument("--method", default=DEMO_METHOD, help=f"detector (default {DEMO_METHOD})")
    p.add_argument("--weights", default="offline",
                   help="backbone weights (default: offline ImageNet weights, needs omniad[offline-weights])")
    p.add_argument("--seed", type=int, default=0, help="seed for the data and the model (default 0)")
    return parser, names


def _version() -> str:
    from omniad._version import __version__

    return f"omniad {__version__}"


def _method_from_argv(argv: list[str]) -> tuple[str | None, str | None]:
    command = argv[0] if argv else None
    if command not in ("fit", "run"):
        return command, None
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default=DEFAULT_METHOD)
    known, _ = pre.parse_known_args(argv[1:])
    return command, known.method


def _join_processes(args: argparse.Namespace) -> None:
    """Under ``torchrun`` (WORLD_SIZE > 1): join the process group; only rank 0 prints results."""
    from omniad.distributed import init_from_env, is_main

    if init_from_env(getattr(args, "device", None) or "auto") and not is_main():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (every rank computes the same; one reports it)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        command, method = _method_from_argv(argv)
        parser, names = build_parser(command, method)
        args = parser.parse_args(argv)
        _join_processes(args)
        started = time.perf_counter()
        with_names = {"fit": cmd_fit, "run": cmd_run}  # the commands that take the method's option names
        plain = {"eval": cmd_eval, "predict": cmd_predict, "export": cmd_export, "quantize": cmd_quantize,
                 "serve": cmd_serve,
                 "calibrate": cmd_calibrate, "adapt": cmd_adapt, "list": cmd_list, "demo": cmd_demo}
        if args.command in with_names:
            code = with_names[args.command](args, names)
        else:
            code = plain[args.command](args)
        print(f"done in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("omniad: interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError) as err:
        if os.environ.get("OMNIAD_DEBUG"):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"omniad: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
