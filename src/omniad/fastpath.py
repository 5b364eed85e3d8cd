"""The fast path without a separate step: a torch bundle scored through its exported graph, built once, checked
and cached beside the bundle.

``load_fast(bundle, runtime)`` loads the bundle, exports its whole scoring path (``omniad.export``) for the
runtime, checks the file's scores against the torch model on probe images as ``omniad export`` does (relative
1e-4) and caches it in ``<bundle>.fast/``. A later call finds the file there and skips the export, as long as
the cache's key still matches: the bundle's content (sha256 of its files), omniad's version and the runtime's
version. A bundle saved again, or a new omniad or runtime, builds a new file.

Runtimes: "openvino" (``omniad[openvino]``), "onnxruntime" (``omniad[export]``), "torch" (the bundle as it is).
"auto", the default of ``omniad predict`` and ``omniad serve``, takes the first of ``AUTO_ORDER`` that is
installed and whose parity check passes (OpenVINO first: the fastest in ``benchmarks/results/speed.md``), and
torch when none does, e.g. for a method the exporter cannot trace; what it chose and why is in the model's
``runtime_note``. On a GPU device "auto" keeps torch: the exported CPU runtimes would be the slower choice there.

Precision: "f32" (default: the parity checked) or OpenVINO's "bf16" / "f16" inference hint, an explicit choice
that runs the same cached graph (checked in f32 when built) on OpenVINO alone; its scores move (measured in
``benchmarks/results/speed-fastpath.md``, bf16: up to 1.6-3.6% of the largest score, image AUROC -0.12 to +0.80).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from omniad.export import (
    SUFFIXES,
    ExportedDetector,
    ExportError,
    _input_blockers,
    check_precision,
    export_detector,
    require,
)
from omniad.export import load_model as load_file

RUNTIMES = ("auto", "openvino", "onnxruntime", "torch")
AUTO_ORDER = ("openvino", "onnxruntime")
_FORMAT = {"openvino": "openvino", "onnxruntime": "onnx"}
CACHE_SUFFIX = ".fast"


def cache_folder(bundle: str | os.PathLike) -> Path:
    """Where the exported graphs of ``bundle`` are cached: ``<bundle>.fast`` beside it."""
    path = Path(bundle).resolve()
    return path.with_name(path.name + CACHE_SUFFIX)


def bundle_digest(bundle: str | os.PathLike) -> str:
    """sha256 over the bundle's files (relative names and contents): any save of another model changes it."""
    root = Path(bundle)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(file.relative_to(root).as_posix().encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def cache_key(bundle: str | os.PathLike, runtime: str) -> dict[str, str]:
    """What a cached graph must match to be used: the bundle's content and the versions that built and run it."""
    from omniad._version import __version__

    return {"bundle_sha256": bundle_digest(bundle), "omniad": __version__, "runtime": runtime,
            "runtime_version": importlib.metadata.version(runtime),
            "torch": importlib.metadata.version("torch")}


def installed(runtime: str) -> bool:
    """Whether the Python package of ``runtime`` (named as the runtime) can be imported here, without importing it."""
    import importlib.util

    return runtime == "torch" or importlib.util.find_spec(runtime) is not None


def load_model(path: str | os.PathLike, device: str | None = None, runtime: str | None = None,
               precision: str = "f32") -> Any:
    """Any model omniad writes (``omniad.export.load_model``), on a chosen runtime.

    Args:
        path: a bundle folder or an exported ``.onnx`` / ``.xml`` file.
        device: override the saved device choice.
        runtime: for a bundle, "auto", "openvino", "onnxruntime" or "torch" (``load_fast``); None (default): the
            torch detector. An exported file runs only on its own runtime (or "auto").
        precision: "f32" (default), or "bf16" / "f16" on OpenVINO (see the module docstring).

    Raises:
        BundleError: not a model, naming the path. ValueError: a runtime an exported file cannot run on, or a
        precision its runtime does not take.
    """
    target = Path(path)
    check_precision(precision)
    if target.suffix.lower() in (".onnx", ".xml") and not target.is_dir():
        own = "onnxruntime" if target.suffix.lower() == ".onnx" else "openvino"
        if runtime not in (None, "auto", own):
            raise ValueError(f"{target} is an exported {own} file: it runs on {own}, not {runtime!r} (give the "
                             "model folder it was exported from to choose another runtime)")
        if precision != "f32":
            if own != "openvino":
                raise ValueError(f"precision {precision!r} is OpenVINO's: {target} is an ONNX file (f32 only)")
            return ExportedDetector.load(target, device=device, precision=precision)
    elif runtime is not None:
        return load_fast(target, runtime, device=device, precision=precision)
    elif precision != "f32":
        raise ValueError(f"precision {precision!r} is OpenVINO's: give runtime 'openvino' or 'auto'")
    return load_file(target, device=device)



def load_fast(bundle: str | os.PathLike, runtime: str = "auto", device: str | None = None,
              precision: str = "f32") -> Any:
    """A bundle's model on ``runtime``: an ``ExportedDetector`` for "openvino" / "onnxruntime" (built, checked and
    cached on first use), the torch detector for "torch"; "auto" picks (see the module docstring).

    The model's ``runtime_note`` says which runtime scores and why (and, for an exported graph, whether it was
    built now or found in the cache). ``precision`` other than "f32" runs the graph on OpenVINO alone: "auto"
    then means OpenVINO, and no fallback to another runtime, which would ignore the precision asked for.

    Raises:
        ValueError: an unknown runtime or precision, or a precision the runtime does not take.
        BundleError: ``bundle`` is not a model folder.
        ExportError: an explicit exported runtime was asked for but the method cannot be exported or its graph
            does not reproduce the torch scores (``auto`` falls back to torch instead).
        MissingExtraError: an explicit runtime whose package is not installed.
    """
    from omniad.io import load_detector

    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    check_precision(precision)
    if precision != "f32":
        if runtime not in ("auto", "openvino"):
            raise ValueError(f"precision {precision!r} is OpenVINO's inference hint: runtime {runtime!r} runs f32 "
                             "only (use runtime 'openvino' or 'auto')")
        runtime = "openvino"  # explicit from here: a failure is an error, not a fallback that drops the precision
    detector = load_detector(bundle, device=device)
    if runtime == "torch":
        return _torch(detector, "torch, as asked")
    if runtime == "auto" and str(getattr(detector, "device_", "cpu")).startswith("cuda"):
        return _torch(detector, "torch on the GPU (auto: the exported runtimes run on the CPU here)")
    blockers = (detector.export_blockers() if hasattr(detector, "export_blockers") else []) + _input_blockers(detector)
    if blockers:
        if runtime != "auto":
            raise ExportError(f"{detector.name} cannot run on {runtime}: " + "; ".join(blockers))
        return _torch(detector, "torch (auto: the graph is not exported: " + "; ".join(blockers) + ")")
    if runtime != "auto":
        require(runtime, f"runtime {runtime!r}")  # MissingExtraError naming the extra when it is not installed
        return _exported(detector, Path(bundle), runtime, precision)
    passed_over = []
    for candidate in AUTO_ORDER:
        if not installed(candidate):
            passed_over.append(f"{candidate} is not installed")
            continue
        try:
            model = _exported(detector, Path(bundle), candidate)
        except ExportError as err:
            passed_over.append(f"{candidate}: {err}")
            continue
        model.runtime_note = f"{model.runtime_note} (auto{': ' + '; '.join(passed_over) if passed_over else ''})"
        return model
    return _torch(detector, "torch (auto: " + "; ".join(passed_over) + ")")


def _torch(detector: Any, note: str) -> Any:
    detector.runtime_note = note
    return detector


def _exported(detector: Any, bundle: Path, runtime: str, precision: str = "f32") -> ExportedDetector:
    """The cached graph of ``bundle`` for ``runtime``, built (exported and parity-checked in f32) when the cache
    holds none that matches, run at ``precision``; a folder that cannot be written gets a graph built in a
    temporary folder instead."""
    moved = "" if precision == "f32" else f"; run in {precision}: its scores move, see omniad.fastpath"
    key = cache_key(bundle, runtime)
    folder = cache_folder(bundle)
    file = folder / f"{runtime}{SUFFIXES[_FORMAT[runtime]]}"
    key_file = folder / f"{runtime}.key.json"
    if file.is_file() and _read_key(key_file) == key:
        model = ExportedDetector.load(file, precision=precision)
        model.runtime_note = (f"{runtime} {precision} (cached graph {file}, parity checked in f32 when it was "
                              f"built{moved})")
        return model
    started = time.perf_counter()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        key_file.unlink(missing_ok=True)  # the old graph is stale from here on, whatever happens next
        where = file
    except OSError:
        where = Path(tempfile.mkdtemp(prefix="omniad-fast-")) / file.name
    export_detector(detector, where, format=_FORMAT[runtime], verify=True)
    if where == file:
        _write_key(key_file, key)  # last: a key names a complete, checked graph
    model = ExportedDetector.load(where, precision=precision)
    model.runtime_note = (f"{runtime} {precision} (graph built and checked against the torch model in f32 in "
                          f"{time.perf_counter() - started:.1f} s, cached at {where}{moved})")
    return model


def _read_key(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_key(path: Path, key: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        json.dump(key, handle, indent=1)
    os.replace(tmp, path)


__all__ = ["AUTO_ORDER", "RUNTIMES", "bundle_digest", "cache_folder", "cache_key", "installed", "load_fast",
           "load_model"]
