"""INT8: post-training quantisation of a bundle's exported OpenVINO graph with NNCF, calibrated on the model's own
held-out normal images, its threshold re-set on the quantised scores of the same images.

The held-out normals are the images ``fit`` set the threshold on and never trained on. They are not stored in the
bundle, so ``quantize_model`` takes the training data again and draws the same hold-out (``split_calibration``:
the same seed, the same clusters); the torch model's scores of the images drawn must be the calibration's normal
scores, which proves they are the right ones (another folder is refused by name).

Only the backbone is quantised: NNCF's ignored scope keeps every operation of the method's own head in float32
(PaDiM's Mahalanobis distance, PatchCore's nearest-neighbour search, the Gaussian smoothing of the map), where
8-bit steps would be amplified into the score. What changes is stated and bounded: the largest change of a
held-out normal image's score, relative to the float32 threshold, must not pass ``max_score_change``; the decisions
changed at the float32 threshold are counted. Past the bound, nothing is written and the error says by how much.

Needs ``omniad[int8]`` (nncf, openvino). The file written is an OpenVINO ``.xml`` (+ ``.bin``) that loads like
any export (``omniad.load_model``, ``omniad predict --model model-int8.xml``); its metadata carries
``"precision": "int8"`` and the measured change under ``"quantization"``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omniad.calibration import Calibration
from omniad.export import (
    DEFAULT_OPSET,
    METADATA_KEY,
    ExportedDetector,
    ExportError,
    export_detector,
    export_metadata,
    float_to_uint8,
    require,
)

# the largest score change of a held-out normal, relative to the float32 threshold, that an INT8 graph may have
DEFAULT_MAX_SCORE_CHANGE = 0.25  # measured: PaDiM on kolektor's 23 held-out normals 0.22
_QUANTISED = "backbone"  # the operations NNCF may quantise: those of the backbone's modules (by traced name)
_WEIGHTED_TYPES = {"Convolution", "GroupConvolution", "MatMul", "ConvolutionBackpropData", "Multiply", "Add"}


class QuantizationError(ExportError):
    """An INT8 graph is refused (its score change passes the bound) or cannot be made; the message says why."""


@dataclass
class QuantizationReport:
    """What quantising changed, on the held-out normal images (``quantize_model``'s result; also in the file)."""

    path: str
    method: str
    calibration_images: int
    seconds: float
    max_score_change: float  # largest |int8 - f32| score of a held-out normal, relative to |f32 threshold|
    mean_score_change: float
    decisions_changed: int  # held-out normals decided otherwise at the f32 threshold
    threshold_f32: float
    threshold_int8: float
    bound: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (f"INT8 {self.method} written to {self.path} in {self.seconds:.1f} s, calibrated on "
                f"{self.calibration_images} held-out normal images: score change of those images at most "
                f"{100 * self.max_score_change:.2f}% of the float32 threshold "
                f"(mean {100 * self.mean_score_change:.2f}%; "
                f"bound {100 * self.bound:g}%), {self.decisions_changed} decisions changed at it; threshold re-set "
                f"on the INT8 scores: {self.threshold_f32:.6g} -> {self.threshold_int8:.6g}")


def held_out_normals(detector: Any, data: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """The model's held-out normal images drawn again from its training ``data``: (uint8 (N, H, W, 3) images, as
    an exported graph takes them; their clusters or None).

    Raises:
        QuantizationError: the model has no calibration, or ``data`` does not give its held-out images back.
    """
    from omniad.data.sources import as_image_dataset, iterate_batches

    calibration: Calibration | None = getattr(detector, "calibration_", None)
    if calibration is None:
        raise QuantizationError(f"{detector.name} has no calibration: INT8 needs the held-out normal images its "
                                "threshold was set on (fit with calibration_fraction > 0)")
    _, held, groups = detector.split_calibration(as_image_dataset(data, detector.read_size))
    if held is None or len(held) != calibration.normal_scores.size:
        found = 0 if held is None else len(held)
        raise QuantizationError(
            f"the training data gives {found} held-out images, the model's threshold was set on "
            f"{calibration.normal_scores.size}: give the training data the model was fitted on")
    batches = list(iterate_batches(held, detector.batch_size))
    scores = torch.cat([detector.score(b).image_scores.double().cpu() for b in batches])  # as calibrate() did
    if not np.allclose(np.sort(scores.numpy()), calibration.normal_scores, rtol=1e-4,
                       atol=1e-6 * float(np.abs(calibration.normal_scores).max())):
        raise QuantizationError(
            "the held-out images drawn from the data given do not score as the model's calibration says: give the "
            "training data (same folder, same categories) the model was fitted on")
    return np.concatenate([float_to_uint8(b) for b in batches]), groups


def quantize_model(
    detector: Any,
    data: Any,
    out: str | os.PathLike,
    max_score_change: float = DEFAULT_MAX_SCORE_CHANGE,
) -> QuantizationReport:
    """Write an INT8 OpenVINO graph of a fitted torch detector (see the module docstring).

    Args:
        detector: a fitted torch detector with a calibration (``omniad.load_detector``).
        data: the training data it was fitted on (any form ``fit`` takes): its held-out normals are drawn again.
        out: the ``.xml`` to write (its ``.bin`` beside it); written only when the change is within the bound.
        max_score_change: the bound on the largest held-out score change, relative to the float32 threshold.

    Raises:
        QuantizationError: past the bound (nothing written), no calibration, the wrong data.
        ExportError: the method cannot be exported. MissingExtraError: nncf or openvino is not installed.
        ValueError: ``out`` is not an .xml path, a bound that is not positive.
    """
    target = Path(out)
    if target.suffix.lower() != ".xml":
        raise ValueError(f"{target}: an INT8 graph is an OpenVINO model, written to a *.xml file")
    if not (isinstance(max_score_change, (int, float)) and max_score_change > 0):
        raise ValueError(f"max_score_change must be a positive number, got {max_score_change!r}")
    nncf = require("nncf", "INT8 quantisation")
    ov = require("openvino", "INT8 quantisation")
    started = time.perf_counter()
    images, groups = held_out_normals(detector, data)
    calibration: Calibration = detector.calibration_
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.stem}.quantizing-", dir=target.parent))
    try:
        export_detector(detector, staging / "f32.xml", format="openvino", verify=True)
        model = ov.Core().read_model(str(staging / "f32.xml"))
        head = [op.get_friendly_name() for op in model.get_ops()
                if op.get_type_name() in _WEIGHTED_TYPES and _QUANTISED not in op.get_friendly_name()]
        batches = [images[i : i + 8] for i in range(0, len(images), 8)]
        f32_scores = _scores(ov, model, batches)  # both graphs on the same uint8 images, as a station feeds them
        quantised = nncf.quantize(model, nncf.Dataset(batches), subset_size=len(batches),
                                  ignored_scope=nncf.IgnoredScope(names=head, validate=False))
        int8_scores = _scores(ov, quantised, batches)
        scale = max(abs(calibration.threshold), 1e-12)
        change = np.abs(int8_scores - f32_scores) / scale
        report = QuantizationReport(
            path=str(target), method=detector.name, calibration_images=len(images), seconds=0.0,
            max_score_change=float(change.max()), mean_score_change=float(change.mean()),
            decisions_changed=int(((int8_scores > calibration.threshold)
                                   != (f32_scores > calibration.threshold)).sum()),
            threshold_f32=calibration.threshold, threshold_int8=float("nan"), bound=float(max_score_change))
        if not np.isfinite(int8_scores).all():
            raise QuantizationError(f"{detector.name}: the INT8 graph gives NaN or infinite scores on held-out normals")
        if report.max_score_change > max_score_change:
            raise QuantizationError(
                f"{detector.name}: INT8 changes a held-out normal image's score by up to "
                f"{100 * report.max_score_change:.1f}% of the float32 threshold (mean "
                f"{100 * report.mean_score_change:.1f}%; {report.decisions_changed} of {len(images)} decisions "
                f"changed), past the bound of {100 * max_score_change:g}%; nothing was written (raise "
                "max_score_change to accept it, or keep the float32 graph)")
        rescored = Calibration.from_normal_scores(
            int8_scores, calibration.target_far, f"{calibration.source}; threshold re-set on the INT8 scores", groups)
        report.threshold_int8 = rescored.threshold
        report.seconds = time.perf_counter() - started
        metadata = export_metadata(detector, "openvino", DEFAULT_OPSET)
        metadata.update(precision="int8", threshold=rescored.threshold, calibration=rescored.to_dict(),
                        quantization={**report.to_dict(), "tool": f"nncf {nncf.__version__}",
                                      "quantised": "the backbone's operations; the method's head in float32"})
        quantised.set_rt_info(json.dumps(metadata, allow_nan=False), [METADATA_KEY])
        staged = staging / target.name
        ov.save_model(quantised, str(staged), compress_to_fp16=False)
        ExportedDetector.load(staged)  # reads back: metadata, signature, threshold
        for file in (staged.with_suffix(".bin"), staged):  # the .bin before the .xml that names it
            os.replace(file, target.parent / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _scores(ov: Any, model: Any, batches: list[np.ndarray]) -> np.ndarray:
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return np.concatenate([np.asarray(compiled(b)["image_scores"], np.float64) for b in batches])


__all__ = ["DEFAULT_MAX_SCORE_CHANGE", "QuantizationError", "QuantizationReport", "held_out_normals",
           "quantize_model"]
