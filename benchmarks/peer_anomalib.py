"""The peer's side of ``benchmarks/speed.py``: anomalib's PaDiM or PatchCore on one MVTec-layout type, fitted and
run as an anomalib user would (Engine + Folder datamodule, ``engine.predict(data_path=...)`` from the files), with
omniad's offline ImageNet weights for the same backbone (no hub download here). Run in an environment where
anomalib is installed (``pip install anomalib`` in a separate venv); prints one JSON line.

    /path/to/venv/bin/python benchmarks/peer_anomalib.py --category kolektor --method padim
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import peak_rss_mib

# the backbone stages omniad uses: PaDiM timm indices 1, 2, 3; PatchCore 2, 3 (tf_efficientnet_lite0's modules)
LAYERS = {"padim": ["blocks.1", "blocks.2", "blocks.4"], "patchcore": ["blocks.2", "blocks.4"]}


def build(method: str, weights: str):
    from anomalib.models import Padim, Patchcore
    from safetensors.torch import load_file

    common = dict(backbone="tf_efficientnet_lite0", layers=LAYERS[method], pre_trained=False, visualizer=False,
                  evaluator=False)
    model = Padim(n_features=100, **common) if method == "padim" else Patchcore(coreset_sampling_ratio=0.01,
                                                                                  **common)
    extractor = model.model.feature_extractor.feature_extractor
    state = load_file(weights)
    own = extractor.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise SystemExit(f"the offline weights lack {len(missing)} feature tensors (first {missing[0]})")
    extractor.load_state_dict({k: state[k] for k in own})
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--category", default="kolektor")
    parser.add_argument("--method", choices=sorted(LAYERS), default="padim")
    parser.add_argument("--weights", required=True, help="omniad's converted offline weights (safetensors)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from lightning.pytorch import seed_everything

    seed_everything(args.seed)  # the coreset's random first centre, PaDiM's random feature subset
    from anomalib.data import Folder
    from anomalib.engine import Engine

    from omniad.data import MVTecDataset
    from omniad.metrics import image_auroc
    from omniad.metrics.pro import aupro

    root = Path(args.data) / args.category
    # every defect folder of the MVTec layout; no masks: the metrics below read them with omniad's reader
    defects = sorted(f"test/{d.name}" for d in (root / "test").iterdir() if d.is_dir() and d.name != "good")
    datamodule = Folder(name=args.category, root=root, normal_dir="train/good", abnormal_dir=defects,
                        normal_test_dir="test/good", train_batch_size=16, eval_batch_size=16, num_workers=0,
                        seed=args.seed)
    model = build(args.method, args.weights)
    engine = Engine(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, default_root_dir=
                    tempfile.mkdtemp(prefix="anomalib-"))
    started = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - started

    test = MVTecDataset(args.data, categories=[args.category], split="test", image_size=256)
    with tempfile.TemporaryDirectory() as tmp:  # every test file in one folder, as a line's images would be
        for record in test.samples:
            os.symlink(record.path, Path(tmp) / f"{record.defect_type}__{Path(record.path).name}")
        started = time.perf_counter()
        batches = engine.predict(model=model, data_path=tmp, return_predictions=True)
        predict_seconds = time.perf_counter() - started
        scores, maps, names = [], [], []
        for batch in batches:
            scores.append(batch.pred_score.reshape(-1).float())
            maps.append(batch.anomaly_map.reshape(len(batch.image_path), *batch.anomaly_map.shape[-2:]).float())
            names += [Path(p).name for p in batch.image_path]
    by_name = {f"{r.defect_type}__{Path(r.path).name}": i for i, r in enumerate(test.samples)}
    order = [by_name[n] for n in names]
    labels = np.array([test.samples[i].label for i in order])
    masks = np.stack([test[i].mask.numpy() > 0.5 for i in order])
    amaps = torch.nn.functional.interpolate(torch.cat(maps)[:, None], size=masks.shape[-2:], mode="bilinear")[:, 0]
    print(json.dumps({
        "tool": "anomalib", "method": args.method, "category": args.category, "n_test": len(names),
        "fit_seconds": fit_seconds, "predict_seconds": predict_seconds,
        "images_per_second": len(names) / predict_seconds,
        "image_auroc": image_auroc(labels, torch.cat(scores).numpy()),
        "aupro": aupro(masks, amaps.numpy()),
        "memory": peak_rss_mib(),
    }))


if __name__ == "__main__":
    main()
