"""Record every registered detector's scores on the tiny synthetic set (fixed seed) as the golden reference.

``tests/test_golden.py`` compares against the files this writes. Run it only when a change of scores is intended,
and say so in the commit:

    python tests/golden/make_golden.py            # every key
    python tests/golden/make_golden.py musc       # only these keys; the others stay as recorded

Two kinds of method, two ways of being "the same scores" on another CPU:

- Training-free methods (one pass of the frozen backbone, then statistics or a nearest-neighbour search) give the
  same scores to float32 rounding on any CPU: they are recorded and compared in the test's own process, with the
  machine's own kernels, to 1e-5.
- Trained methods run hundreds of SGD steps, and an SGD step turns a last-bit difference of one kernel (AVX-512
  against AVX2 convolutions, MKL's Intel against its AMD code path) into a different model: measured 0.2-6% on the
  tiny set, and 37-115% for CADA, whose scores divide by a small spread. They are recorded and compared in a
  subprocess whose kernels do not depend on the CPU (``PINNED_ENV`` and ``pin_kernels``): ATen's generic (non-
  vectorised) kernels, MKL's conditional numerical reproducibility in its cross-vendor ``COMPATIBLE`` mode, no
  oneDNN and no NNPACK (their JIT kernels follow the CPU's instruction set and cache sizes; without them
  convolutions are im2col + MKL GEMM), one thread, deterministic algorithms. There, too, they must match to 1e-5.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

GOLDEN = HERE / "scores.safetensors"
META = HERE / "scores.json"
IMAGE_SIZE = 64
COMMON = dict(weights="offline", image_size=IMAGE_SIZE, batch_size=8, device="cpu", progress=False, seed=0)
# Methods whose scores come without training (frozen backbone + statistics / nearest neighbours / mutual scoring).
TRAINING_FREE = frozenset({"padim", "patchcore", "musc", "knn"})

# Read by torch, MKL and oneDNN when they load, hence a fresh process. ATEN_CPU_CAPABILITY=default: ATen's kernels
# compiled for baseline x86-64; MKL_CBWR=COMPATIBLE: MKL's code path that gives the same results on Intel and
# non-Intel CPUs (its documented cross-vendor mode); one thread everywhere (a parallel reduction's order follows the
# thread count). The oneDNN / MKL instruction caps are belt and braces: oneDNN is switched off in pin_kernels.
PINNED_ENV = {
    "ATEN_CPU_CAPABILITY": "default",
    "MKL_CBWR": "COMPATIBLE",
    "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
    "ONEDNN_MAX_CPU_ISA": "SSE41",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


def pin_kernels() -> None:
    """In the pinned subprocess: kernels that do not follow the CPU (see the module's docstring)."""
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False  # oneDNN's JIT convolutions: CPU-dependent blocking and instructions
    torch.backends.nnpack.set_flags(False)  # NNPACK's convolutions: AVX2 or generic by CPU
    torch.use_deterministic_algorithms(True)


def golden_settings() -> dict[str, tuple[str, dict]]:
    """key -> (registered method, its settings): each method's tiny test settings, as the method declares them."""
    from omniad import list_detectors
    from omniad.registry import detector_class

    settings = {name: (name, dict(detector_class(name).test_params)) for name in list_detectors()}
    # CADA over a trained base too: the base's part of the lifecycle runs inside CADA's
    revdist = dict(detector_class("revdist").test_params)
    settings["cada_over_revdist"] = ("cada", {"base": "revdist", "base_params": revdist, "iterations": 50})
    return settings


def is_pinned(key: str) -> bool:
    """Whether ``key``'s scores are recorded and compared under the pinned kernels (every trained method)."""
    return golden_settings()[key][0] not in TRAINING_FREE


def compute(keys: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Fit each key's detector on the tiny synthetic set and return its scores, maps and threshold."""
    from conftest import SYNTHETIC_PARAMS
    from omniad import create_detector
    from omniad.data import MVTecDataset
    from omniad.data.synthetic import make_synthetic_dataset

    settings = golden_settings()
    tensors, meta = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        params = dict(SYNTHETIC_PARAMS)
        root = make_synthetic_dataset(Path(tmp), categories=list(params.pop("categories")), **params)
        train = MVTecDataset(root, split="train", image_size=IMAGE_SIZE)
        test = MVTecDataset(root, split="test", image_size=IMAGE_SIZE)
        images = torch.stack([test[i].image for i in range(len(test))])
        for key in keys:
            method, tiny = settings[key]
            detector = create_detector(method, **{**COMMON, **tiny}).fit(train)
            result = detector.score(images)
            tensors[f"{key}.image_scores"] = result.image_scores.contiguous()
            tensors[f"{key}.anomaly_maps"] = result.anomaly_maps[::4].contiguous()  # every 4th image's map
            meta[key] = {"method": method, "params": tiny, "threshold": float(detector.threshold_),
                         "pinned": is_pinned(key)}
    return tensors, meta


def compute_pinned(keys: list[str], out: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """``compute(keys)`` in a fresh process under ``PINNED_ENV`` and ``pin_kernels``; files under ``out``."""
    env = {**os.environ, **PINNED_ENV}
    subprocess.run([sys.executable, str(Path(__file__)), "--pinned-worker", str(out), *keys], env=env, check=True)
    return load_file(str(out / "scores.safetensors")), json.loads((out / "scores.json").read_text())


def main(argv: list[str]) -> None:
    if argv[:1] == ["--pinned-worker"]:  # the subprocess of compute_pinned
        pin_kernels()
        out, keys = Path(argv[1]), argv[2:]
        tensors, meta = compute(keys)
        save_file(tensors, str(out / "scores.safetensors"))
        (out / "scores.json").write_text(json.dumps(meta))
        return
    torch.set_num_threads(1)
    settings = golden_settings()
    only = argv
    tensors, meta = {}, {}
    if only:  # re-record these keys, keep every other as it was
        unknown = sorted(set(only) - set(settings))
        if unknown:
            raise SystemExit(f"unknown golden keys {unknown}; known: {', '.join(sorted(settings))}")
        tensors = {k: v for k, v in load_file(str(GOLDEN)).items() if k.split(".")[0] not in only}
        meta = {k: v for k, v in json.loads(META.read_text()).items() if k not in only}
    keys = only or sorted(settings)
    native = [k for k in keys if not is_pinned(k)]
    pinned = [k for k in keys if is_pinned(k)]
    for part_tensors, part_meta in [compute(native)] + ([compute_pinned(pinned, Path(tempfile.mkdtemp()))]
                                                       if pinned else []):
        tensors.update(part_tensors)
        meta.update(part_meta)
    for key in keys:
        print(key, "threshold", meta[key]["threshold"], "(pinned kernels)" if meta[key]["pinned"] else "", flush=True)
    save_file(tensors, str(GOLDEN))
    META.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
