"""``omniad demo``: the main job on an embedded default — a synthetic multi-type line, one unified model, one
threshold — with no data or weight downloads (the backbone's ImageNet weights come from the offline extra)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

# CPU-friendly settings the demo chooses explicitly (the detectors' own defaults stay the papers').
DEMO_PARAMS: dict[str, dict[str, Any]] = {
    "patchcore": {"coreset_ratio": 0.01},
}
DEMO_IMAGE_SIZE = 256


def run_demo(
    out: str | Path = "omniad-demo", method: str = "patchcore", weights: str = "offline", seed: int = 0
) -> Any:
    """Generate the synthetic set, fit ``method`` unified on all types, evaluate, write report and overlays.

    Returns:
        The evaluation ``Report``.
    """
    from omniad.data import MVTecDataset
    from omniad.data.synthetic import make_synthetic_dataset
    from omniad.metrics import evaluate
    from omniad.registry import create_detector
    from omniad.report import save_overlay

    out = Path(out)
    started = time.perf_counter()
    root = make_synthetic_dataset(out / "data", seed=seed)
    train = MVTecDataset(root, split="train", image_size=DEMO_IMAGE_SIZE)
    test = MVTecDataset(root, split="test", image_size=DEMO_IMAGE_SIZE)
    _say(f"synthetic line written to {root}: {', '.join(train.categories)} "
         f"({len(train)} normal training images, {len(test)} test images)")
    detector = create_detector(
        method, weights=weights, image_size=DEMO_IMAGE_SIZE, seed=seed, **DEMO_PARAMS.get(method, {})
    )
    _say(f"fitting one {method} model on all types at once (no type labels)...")
    detector.fit(train)
    detector.save(out / "model")
    report = evaluate(detector, test, progress=detector.progress)
    report.save(out)
    _write_overlays(detector, test, out / "overlays", save_overlay)
    print(report.to_markdown())
    _say(f"demo finished in {time.perf_counter() - started:.0f} s: model in {out / 'model'}, report in "
         f"{out / 'report.md'}, overlays in {out / 'overlays'}")
    return report


def _write_overlays(detector: Any, test: Any, folder: Path, save_overlay: Any) -> None:
    """One heatmap overlay per (category, defect type) of the test set, on one colour scale (the one
    ``omniad predict`` uses: ``omniad.report.overlay_scale``)."""
    import torch

    from omniad.report import overlay_scale

    chosen: dict[tuple[str, str], int] = {}
    for i, record in enumerate(test.samples):
        if record.label == 1:
            chosen.setdefault((record.category, record.defect_type), i)
    indices = list(chosen.values())
    if not indices:
        return
    samples = [test[i] for i in indices]
    result = detector.score(torch.stack([s.image for s in samples]))
    calibration = getattr(detector, "calibration_", None)
    vmin, vmax = overlay_scale(result.anomaly_maps, None if calibration is None else calibration.threshold)
    for sample, amap in zip(samples, result.anomaly_maps):
        name = f"{sample.category}_{sample.defect_type}_{Path(sample.path).stem}.png"
        save_overlay(sample.image, amap, folder / name, vmin=vmin, vmax=vmax)


def _say(text: str) -> None:
    print(text, file=sys.stderr)
