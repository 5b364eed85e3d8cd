"""Record every registered detector's scores on the tiny synthetic set (fixed seed) as the golden reference.

``tests/test_golden.py`` compares against the files this writes. Run it only when a change of scores is intended,
and say so in the commit:

    python tests/golden/make_golden.py            # every key
    python tests/golden/make_golden.py musc       # only these keys; the others stay as recorded

Every method, trained or not, is fitted and scored in the caller's process with the machine's own kernels, and
compared to a tolerance that holds on any x86-64 CPU while catching a real change:

- Training-free methods (one pass of the frozen backbone, then statistics, a nearest-neighbour search or mutual
  scoring) give the same scores to float32 rounding on any CPU: compared to 1e-5.
- Trained methods are recorded after a few optimiser steps (``SHORT_TRAINING``). An SGD run amplifies a last-bit
  difference of one kernel into a different model: after the tiny settings' 30-60 steps, one Intel machine's
  AVX-512 + oneDNN kernels and ATen's generic ones gave scores 0.1% (Reverse Distillation) to 6.4% (UniAD) apart,
  and even kernels pinned to be CPU-independent (generic ATen, MKL_CBWR, no oneDNN) gave CADA over Reverse
  Distillation scores 39% apart on two Intel machines. After 1-5 steps the first two kernel sets differ by at
  most 1.4e-4 of the largest value (UniAD's maps), while a 5% change of a learning rate moves the scores by 3.6e-3
  (Reverse Distillation) to 9e-3 (CADA) of the largest value: trained methods are compared to
  ``TRAINED_TOLERANCE`` = 1e-3 of the largest golden value (a 1% change of UniAD's learning rate, 2.5e-4, passes).
"""

from __future__ import annotations

import json
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
# A trained method's golden run: its tiny test settings, cut to a few optimiser steps (see the module's docstring).
SHORT_TRAINING = {
    "cada": {"iterations": 5},
    "mkd": {"epochs": 1},
    "pmad": {"epochs": 1},
    "recontrast": {"iterations": 3},
    "revdist": {"iterations": 3},
    "uniad": {"epochs": 1},
}
TRAINING_FREE_TOLERANCE = 1e-5  # relative and absolute: float32 rounding of one backbone pass
TRAINED_TOLERANCE = 1e-3  # of the largest golden value: 7x the largest kernel-set difference measured

def golden_settings() -> dict[str, tuple[str, dict]]:
    """key -> (registered method, its settings): each method's tiny test settings, as the method declares them."""
    from omniad import list_detectors
    from omniad.registry import detector_class

    def settings_of(name: str) -> dict:
        if name not in TRAINING_FREE and name not in SHORT_TRAINING:
            raise KeyError(f"{name} is trained: give its few-step golden settings in SHORT_TRAINING "
                           "(tests/golden/make_golden.py)")
        return {**detector_class(name).test_params, **SHORT_TRAINING.get(name, {})}

    settings = {name: (name, settings_of(name)) for name in list_detectors()}
    # CADA over a trained base too: the base's part of the lifecycle runs inside CADA's
    settings["cada_over_revdist"] = ("cada", {"base": "revdist", "base_params": settings_of("revdist"),
                                              **SHORT_TRAINING["cada"]})
    return settings


def is_trained(key: str) -> bool:
    return golden_settings()[key][0] not in TRAINING_FREE


def tolerance(key: str, golden: torch.Tensor) -> dict[str, float]:
    """``torch.testing.assert_close`` arguments for ``key``'s values against ``golden`` (see the docstring)."""
    if not is_trained(key):
        return {"rtol": TRAINING_FREE_TOLERANCE, "atol": TRAINING_FREE_TOLERANCE}
    return {"rtol": 0.0, "atol": TRAINED_TOLERANCE * max(float(golden.abs().max()), 1e-6)}


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
                         "trained": is_trained(key)}
    return tensors, meta


def main(argv: list[str]) -> None:
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
    new_tensors, new_meta = compute(keys)
    tensors.update(new_tensors)
    meta.update(new_meta)
    for key in keys:
        print(key, "threshold", meta[key]["threshold"], flush=True)
    save_file(tensors, str(GOLDEN))
    META.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
