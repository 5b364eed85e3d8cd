"""Record every registered detector's scores on the tiny synthetic set (fixed seed) as the golden reference.

The lifecycle refactor (issue "One detector lifecycle") must keep these numbers to 1e-5; ``tests/test_golden.py``
compares against the file this writes. Run it only when a change of scores is intended, and say so in the commit:

    python tests/golden/make_golden.py            # every key
    python tests/golden/make_golden.py musc       # only these keys; the others stay as recorded
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

GOLDEN = HERE / "scores.safetensors"
META = HERE / "scores.json"
IMAGE_SIZE = 64
COMMON = dict(weights="offline", image_size=IMAGE_SIZE, batch_size=8, device="cpu", progress=False, seed=0)


def golden_settings() -> dict[str, tuple[str, dict]]:
    """key -> (registered method, its settings): each method's tiny test settings, as the method declares them."""
    from omniad import list_detectors
    from omniad.registry import detector_class

    settings = {name: (name, dict(detector_class(name).test_params)) for name in list_detectors()}
    # CADA over a trained base too: the base's part of the lifecycle runs inside CADA's
    revdist = dict(detector_class("revdist").test_params)
    settings["cada_over_revdist"] = ("cada", {"base": "revdist", "base_params": revdist, "iterations": 50})
    return settings


def main(only: list[str]) -> None:
    torch.set_num_threads(1)
    from safetensors.torch import load_file

    from conftest import SYNTHETIC_PARAMS
    from omniad import create_detector
    from omniad.data import MVTecDataset
    from omniad.data.synthetic import make_synthetic_dataset

    settings = golden_settings()
    tensors, meta = {}, {}
    if only:  # re-record these keys, keep every other as it was
        unknown = sorted(set(only) - set(settings))
        if unknown:
            raise SystemExit(f"unknown golden keys {unknown}; known: {', '.join(sorted(settings))}")
        tensors = {k: v for k, v in load_file(str(GOLDEN)).items() if k.split(".")[0] not in only}
        meta = {k: v for k, v in json.loads(META.read_text()).items() if k not in only}
        settings = {k: v for k, v in settings.items() if k in only}
    with tempfile.TemporaryDirectory() as tmp:
        params = dict(SYNTHETIC_PARAMS)
        root = make_synthetic_dataset(Path(tmp), categories=list(params.pop("categories")), **params)
        train = MVTecDataset(root, split="train", image_size=IMAGE_SIZE)
        test = MVTecDataset(root, split="test", image_size=IMAGE_SIZE)
        images = torch.stack([test[i].image for i in range(len(test))])
        for name, (method, tiny) in settings.items():
            detector = create_detector(method, **{**COMMON, **tiny}).fit(train)
            result = detector.score(images)
            tensors[f"{name}.image_scores"] = result.image_scores.contiguous()
            tensors[f"{name}.anomaly_maps"] = result.anomaly_maps[::4].contiguous()  # every 4th image's map
            meta[name] = {"method": method, "params": tiny, "threshold": float(detector.calibration_.threshold
                                                             if hasattr(detector, "calibration_")
                                                             else detector.threshold_)}
            print(name, "threshold", meta[name]["threshold"], flush=True)
    save_file(tensors, str(GOLDEN))
    META.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
