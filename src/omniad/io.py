"""Model bundles: a folder with config.json and weights.safetensors (no pickle), written atomically."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

FORMAT = "omniad-detector"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"


class BundleError(ValueError):
    """A model bundle is missing, corrupt, foreign or from an incompatible version."""


def save_detector(detector: Any, path: str | os.PathLike) -> Path:
    """Write ``detector`` to the folder ``path``.

    The bundle is written into a temporary sibling folder and swapped in by renames, so a crash mid-save leaves
    the previous good bundle (or nothing) at ``path``, never a half-written one.
    """
    from omniad._version import __version__

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in detector.state_tensors().items()}
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "omniad_version": __version__,
        "method": detector.name,
        "params": detector.get_params(),
        "meta": _finite_or_none(detector.fitted_meta()),
    }
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
    try:
        save_file(tensors, str(staging / WEIGHTS_FILE))
        with open(staging / CONFIG_FILE, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _swap_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _swap_in(staging: Path, target: Path) -> None:
    if target.exists() and not target.is_dir():
        raise BundleError(f"{target} exists and is a file, not an omniad model folder; refusing to overwrite it")
    if target.exists() and not (target / CONFIG_FILE).exists() and any(target.iterdir()):
        raise BundleError(f"{target} exists and is not an omniad model folder; refusing to overwrite it")
    if not target.exists():
        os.replace(staging, target)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rmdir(retired)
    os.replace(target, retired)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(retired, target)  # put the previous good bundle back where it stood
        raise
    shutil.rmtree(retired, ignore_errors=True)


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The bundle's config.json, checked for format and version."""
    folder = Path(path)
    config_path = folder / CONFIG_FILE
    if not folder.exists():
        raise BundleError(f"no model at {folder}: the folder does not exist")
    if not config_path.is_file():
        raise BundleError(f"{folder} is not an omniad model: {CONFIG_FILE} is missing")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{config_path} is corrupt: {err}") from None
    if not isinstance(config, dict):
        raise BundleError(f"{config_path} is not an omniad model config (a JSON {type(config).__name__})")
    if config.get("format") != FORMAT:
        raise BundleError(f"{config_path} is not an omniad model config (format {config.get('format')!r})")
    if config.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{folder} has bundle format {config.get('format_version')}; this omniad reads {FORMAT_VERSION}"
        )
    return config


def load_detector(path: str | os.PathLike, device: str | None = None):
    """Load a detector saved with ``Detector.save``; ``device`` overrides the saved device choice."""
    from omniad.registry import detector_class

    folder = Path(path)
    config = read_config(folder)
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise BundleError(f"{folder} is incomplete: {WEIGHTS_FILE} is missing")
    try:
        tensors = load_file(str(weights_path))
    except Exception as err:  # safetensors raises several types for corrupt headers
        raise BundleError(f"{weights_path} is corrupt: {err}") from None
    params = config.get("params")
    if not isinstance(params, dict) or not isinstance(config.get("method"), str):
        raise BundleError(f"{folder / CONFIG_FILE} lacks the method name or its parameters")
    params = dict(params)
    if device is not None:
        params["device"] = device
    try:
        detector = detector_class(config["method"])(**_tuples(params))
        detector.resolved_params()  # validate the saved parameters now, naming the file
    except KeyError as err:  # unknown method: the message lists the known ones
        raise BundleError(f"{folder}: {err.args[0]}") from None
    except TypeError as err:  # parameters this version of the method does not have
        raise BundleError(f"{folder}: its parameters do not fit method {config['method']!r}: {err}") from None
    except ValueError as err:  # a parameter out of range (validated at load as at fit)
        raise BundleError(f"{folder / CONFIG_FILE}: {err}") from None
    meta = config.get("meta") or {}
    if not isinstance(meta, dict):
        raise BundleError(f"{folder / CONFIG_FILE}: 'meta' must be a mapping")
    try:
        detector.load_state(meta, tensors)
    except ValueError as err:  # out-of-range values, a tampered calibration
        raise BundleError(f"{folder / CONFIG_FILE}: {err}") from None
    except (RuntimeError, KeyError, IndexError, TypeError) as err:
        if "CUDA" in str(err):
            raise BundleError(f"{folder}: {err}") from None
        raise BundleError(f"{folder}: weights do not match the model described in its config: {err}") from None
    return detector


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN: store non-finite floats as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def _tuples(params: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}
