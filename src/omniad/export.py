"""Export a fitted detector to one ONNX or OpenVINO file that holds its whole scoring path, and score with it.

The exported graph:

    input   "images"        uint8 (B, H, W, 3), RGB, H = W = the model's image_size, batch size free (NHWC: what
                            image decoders and cameras hand over; no transpose on the station's side)
    output  "image_scores"  float32 (B,), higher = more anomalous
            "anomaly_maps"  float32 (B, H, W)

Inside it: the division by 255, the backbone's normalisation, the backbone, the method (``features`` then
``score_features``), the up-sampling, Gaussian smoothing and pooling (``BaseDetector.postprocess``) and, for CADA,
its base's whole path and the alignment. It is traced by ``torch.onnx.export`` from the fitted detector's own
``score_batch`` (those three stages): nothing is written twice, so the file scores what the model scores.

The file carries, as JSON under the key ``omniad`` (ONNX ``metadata_props``; OpenVINO ``rt_info``), the method,
its parameters, the image size, the backbone, the input's layout, the threshold with the whole ``Calibration``
(its normal scores, so the threshold can be re-set at another false-alarm rate), and the protocol. Loading checks
that the threshold follows from its normal scores, as a bundle's load does.

Parity is defined on uint8 images of the model's size: for those, ``ExportedDetector.score`` gives the torch
model's scores (relative 1e-4; measured ~1e-6) and the same decisions. ``score`` takes [0, 1] floats like a torch
detector and turns them into uint8 first, which is exact for images read from 8-bit files at the model's size;
images of another size are resized (as the torch model does) and then rounded to uint8, so their scores may
differ slightly from the torch model's. ``export_detector`` checks parity on probe images before it returns.

Dependencies are extras, imported only here and only when used: ``omniad[export]`` (onnx, onnxruntime) and
``omniad[openvino]``.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from omniad.calibration import Calibration
from omniad.io import BundleError
from omniad.types import AnomalyScores

FORMATS = ("onnx", "openvino")
SUFFIXES = {"onnx": ".onnx", "openvino": ".xml"}
EXTRAS = {"onnx": "export", "onnxruntime": "export", "openvino": "openvino", "nncf": "int8"}
EXPORT_FORMAT = "omniad-exported-detector"
EXPORT_FORMAT_VERSION = 1
METADATA_KEY = "omniad"
INPUT_NAME = "images"
OUTPUT_NAMES = ("image_scores", "anomaly_maps")
DEFAULT_OPSET = 17
# parity demanded of an export on its probe images (scores relative; maps relative to the map's largest value)
PARITY_RTOL = 1e-4
_TRACE_BATCH, _PROBE_BATCH = 2, 3  # probes with another batch size than the trace: the batch axis must be free
PRECISIONS = ("f32", "bf16", "f16")


def check_precision(precision: str) -> None:
    """Refuse an OpenVINO inference precision that is not one of ``PRECISIONS``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


class ExportError(RuntimeError):
    """A detector cannot be exported; the message names what blocks it."""


class ExportedModelError(BundleError):
    """A file is not an exported omniad model, or its metadata is corrupt; the message names the file."""


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require(module: str, purpose: str) -> Any:
    """Import an optional dependency, or say which omniad extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        extra = EXTRAS.get(module, "export")
        raise MissingExtraError(
            f"{purpose} needs the Python package {module!r}, which is not installed: "
            f'pip install "omniad[{extra}]"'
        ) from None


# ------------------------------------------------------------------ the graph
class ScoringGraph(nn.Module):
    """uint8 (B, H, W, 3) RGB images -> (image scores (B,), anomaly maps (B, H, W)), through the fitted detector's
    own ``score_batch`` (``features`` -> ``score_features`` -> ``postprocess``). What ``torch.onnx.export`` traces.

    Args:
        detector: a fitted detector (``BaseDetector``).
    """

    def __init__(self, detector: Any) -> None:
        super().__init__()
        self.detector = detector
        # registered so that the trace names the weights after their modules (the detector itself is not a Module)
        self.held = nn.ModuleList(dict.fromkeys(detector.saved_modules().values()))
        self.eval()  # torch.onnx.export puts a module back in the mode it found it in, recursively

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        # the readers' scaling (uint8 / 255 in float32) and layout; normalisation is the backbone's own
        x = images.permute(0, 3, 1, 2).float() / 255.0
        result = self.detector.score_batch(x)
        return result.image_scores, result.anomaly_maps


# ------------------------------------------------------------------ export
def export_detector(
    detector: Any,
    path: str | os.PathLike,
    format: str = "onnx",
    opset: int = DEFAULT_OPSET,
    verify: bool = True,
) -> Path:
    """Write a fitted detector's whole scoring path to one file (see the module docstring).

    Args:
        detector: a fitted torch detector (``BaseDetector``), e.g. from ``omniad.load_detector``.
        path: the file to write: ``*.onnx`` for "onnx", ``*.xml`` for "openvino" (its weights go to the ``.bin``
            beside it). Written atomically: a failed export leaves no file behind.
        format: "onnx" (needs ``omniad[export]``) or "openvino" (needs ``omniad[openvino]``; converted from the
            ONNX graph, weights kept in float32).
        opset: ONNX opset of the graph.
        verify: score probe images with the torch model and the written file (batch size other than the
            trace's) and refuse the export unless they agree (``PARITY_RTOL``).

    Returns:
        The path written (the ``.xml`` for OpenVINO).

    Raises:
        ExportError: the detector is not fitted, the method cannot be exported (naming what blocks it), the
            tracer fails, or the file does not reproduce the torch scores.
        MissingExtraError: the extra the format needs is not installed.
        ValueError: an unknown format, a path with the wrong suffix, a bad opset.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; use one of {', '.join(FORMATS)}")
    target = Path(path)
    if target.suffix.lower() != SUFFIXES[format]:
        raise ValueError(f"{target}: an {format} export is written to a *{SUFFIXES[format]} file")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 11:
        raise ValueError(f"opset must be an integer >= 11, got {opset!r}")
    name = getattr(detector, "name", type(detector).__name__)
    if not getattr(detector, "fitted_", False):
        raise ExportError(f"{name} is not fitted: fit it or load a saved model before exporting")
    blockers = detector.export_blockers() if hasattr(detector, "export_blockers") else []
    blockers += _input_blockers(detector)
    if blockers:
        raise ExportError(f"{name} cannot be exported: " + "; ".join(blockers))
    if format == "onnx":
        require("onnx", "ONNX export")
        if verify:
            require("onnxruntime", "checking an ONNX export")
    else:
        require("openvino", "OpenVINO export")
    metadata = export_metadata(detector, format, opset)

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.stem}.exporting-", dir=target.parent))
    try:
        graph_file = staging / "graph.onnx"
        _trace(detector, graph_file, opset)
        if format == "onnx":
            written = [_write_onnx(graph_file, staging / target.name, metadata)]
        else:
            written = _write_openvino(graph_file, staging / target.name, metadata)
        if verify:
            _verify(detector, written[0])
        for file in reversed(written):  # the .bin before the .xml that names it
            os.replace(file, target.parent / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _input_blockers(detector: Any) -> list[str]:
    """The input modes the one-size graph does not hold (yet): tiled inspection (a tile count per image, maps
    stitched) and an (height, width) image_size (padding cut off per image)."""
    blockers = []
    if getattr(detector, "tile_size", None) is not None:
        blockers.append(f"tiled inspection (tile_size={detector.tile_size}) is not exported; score it with torch")
    if not isinstance(getattr(detector, "image_size", 0), int):
        blockers.append(f"an (height, width) image_size {list(detector.image_size)} (aspect kept, padding cut) is "
                        "not exported; score it with torch")
    return blockers


def export_metadata(detector: Any, format: str, opset: int) -> dict[str, Any]:
    """What an exported file carries besides its graph (JSON-able)."""
    from omniad._version import __version__
    from omniad.metrics.evaluate import PROTOCOL

    r = detector.resolved_
    size = int(detector.image_size)
    calibration = getattr(detector, "calibration_", None)
    backbone = getattr(detector, "backbone_", None) or getattr(getattr(detector, "base_", None), "backbone_", None)
    tail = {k: _plain(getattr(r, k)) for k in ("sigma", "image_pooling", "top_fraction", "pool_kernel")}
    batch = detector.export_batch_size() if hasattr(detector, "export_batch_size") else detector.batch_size
    return {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "omniad_version": __version__,
        "torch_version": torch.__version__,
        "exported_as": format,
        "opset": opset,
        "method": detector.name,
        "params": detector.get_params(),
        "image_size": size,
        "batch_size": int(batch),
        "backbone": detector.backbone,
        "weights_source": getattr(backbone, "weights_source", None),
        "input": {
            "name": INPUT_NAME,
            "dtype": "uint8",
            "layout": "NHWC",
            "shape": ["batch", size, size, 3],
            "colour": "RGB",
            "range": [0, 255],
        },
        "outputs": {
            OUTPUT_NAMES[0]: "float32 (batch,): image scores, higher = more anomalous",
            OUTPUT_NAMES[1]: f"float32 (batch, {size}, {size}): anomaly maps",
        },
        "threshold": None if calibration is None else calibration.threshold,
        "calibration": None if calibration is None else calibration.to_dict(),
        "protocol": {
            "decision": "anomalous when the image score is strictly above the threshold",
            "score_tail": tail,
            "evaluation": PROTOCOL,
        },
    }


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _trace(detector: Any, file: Path, opset: int) -> None:
    device = getattr(detector, "device_", torch.device("cpu"))
    example = torch.from_numpy(probe_images(_TRACE_BATCH, int(detector.image_size), seed=0)).to(device)
    graph = ScoringGraph(detector)
    modes = {module: module.training for module in graph.modules()}
    axes = {INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in OUTPUT_NAMES}}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer and deprecation chatter; the parity check is the judge
            torch.onnx.export(
                graph, (example,), str(file), dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES), dynamic_axes=axes, do_constant_folding=True,
            )
    except Exception as err:  # the tracer raises many types; its messages can hold a whole graph
        first = str(err).strip().splitlines()[0][:500] if str(err).strip() else type(err).__name__
        raise ExportError(f"{detector.name}: torch.onnx.export failed: {first}") from err
    finally:
        for module, training in modes.items():  # the detector scores as before, whatever the exporter did
            module.training = training


def _write_onnx(graph_file: Path, out: Path, metadata: dict[str, Any]) -> Path:
    onnx = require("onnx", "ONNX export")
    model = onnx.load(str(graph_file))
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata, allow_nan=False)
    model.producer_name = "omniad"
    model.doc_string = f"omniad {metadata['method']}: uint8 (B, H, W, 3) RGB -> image scores, anomaly maps"
    onnx.save(model, str(out))
    return out


def _write_openvino(graph_file: Path, out: Path, metadata: dict[str, Any]) -> list[Path]:
    ov = require("openvino", "OpenVINO export")
    model = ov.convert_model(str(graph_file))
    model.set_rt_info(json.dumps(metadata, allow_nan=False), [METADATA_KEY])
    ov.save_model(model, str(out), compress_to_fp16=False)  # float32 weights: the parity the file promises
    return [out, out.with_suffix(".bin")]


def probe_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """(n, size, size, 3) uint8 images of smooth random colour blobs with noise: inputs to trace and verify with."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((n, 3, 4, 4), dtype=np.float32))
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    noisy = smooth.numpy().transpose(0, 2, 3, 1) * 200 + rng.normal(0, 12, (n, size, size, 3)) + 20
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def _verify(detector: Any, file: Path) -> None:
    images = probe_images(_PROBE_BATCH, int(detector.image_size), seed=1)
    expected = detector.score(uint8_to_float(images))
    try:
        exported = ExportedDetector.load(file)
    except ExportedModelError as err:  # e.g. a graph the tracer reduced to constants has no image input left
        raise ExportError(
            f"{detector.name}: the exported graph does not reproduce the torch model's scores: {err}; some step of "
            "the method is not traceable (Python control flow on values, numpy, a loop sized by the batch)"
        ) from err
    scores, maps = exported.run(images)
    worst = parity(expected.image_scores.numpy(), scores, expected.anomaly_maps.numpy(), maps)
    if not worst <= PARITY_RTOL:
        raise ExportError(
            f"{detector.name}: the exported graph does not reproduce the torch model's scores on probe images "
            f"(largest relative difference {worst:.3g} > {PARITY_RTOL:g}); some step of the method is not "
            "traceable (Python control flow on values, numpy, a loop sized by the batch)"
        )


def parity(scores: np.ndarray, other_scores: np.ndarray, maps: np.ndarray, other_maps: np.ndarray) -> float:
    """The largest relative difference between two sets of scores and maps: scores element by element (with a
    floor of 1e-6 of the largest score, for scores near 0), maps relative to the largest map value."""
    scores, other_scores = np.asarray(scores, np.float64), np.asarray(other_scores, np.float64)
    maps, other_maps = np.asarray(maps, np.float64), np.asarray(other_maps, np.float64)
    if scores.shape != other_scores.shape or maps.shape != other_maps.shape:
        return math.inf
    score_floor = max(float(np.abs(scores).max(initial=0.0)) * 1e-6, 1e-30)
    by_score = np.abs(scores - other_scores) / np.maximum(np.abs(scores), score_floor)
    by_map = np.abs(maps - other_maps) / max(float(np.abs(maps).max(initial=0.0)), 1e-30)
    return float(max(by_score.max(initial=0.0), by_map.max(initial=0.0)))


def uint8_to_float(images: np.ndarray) -> Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [0, 1], as the readers scale 8-bit files."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float() / 255.0


def float_to_uint8(images: Tensor) -> np.ndarray:
    """(B, 3, H, W) floats in [0, 1] (or uint8, kept) -> (B, H, W, 3) uint8 (exact for images read from 8-bit
    files)."""
    from omniad.data.images import to_uint8

    return np.ascontiguousarray(to_uint8(images.cpu()).permute(0, 2, 3, 1).numpy())


# ------------------------------------------------------------------ running an exported file
class _OnnxRuntime:
    def __init__(self, path: Path, device: str | None) -> None:
        ort = require("onnxruntime", "running an ONNX model")
        available = ort.get_available_providers()
        if device in (None, "auto", "cpu"):
            wanted = ["CUDAExecutionProvider"] if device == "auto" and "CUDAExecutionProvider" in available else []
            providers = [*wanted, "CPUExecutionProvider"]
        elif str(device).startswith("cuda"):
            if "CUDAExecutionProvider" not in available:
                raise RuntimeError(f"device {device!r} was asked for, but onnxruntime here has no CUDA provider "
                                   f"(it has {', '.join(available)})")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            raise ValueError(f"an ONNX model runs on 'cpu', 'cuda' or 'auto', not {device!r}")
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
        except Exception as err:  # onnxruntime raises its own types for bad files
            raise ExportedModelError(f"{path} is not a readable ONNX model: {_first_line(err)}") from None
        self.text = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        self.input = (inputs[0].name, inputs[0].type, list(inputs[0].shape)) if len(inputs) == 1 else None
        self.outputs = [o.name for o in outputs]

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores, maps = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})
        return scores, maps


class _OpenVinoRuntime:
    def __init__(self, path: Path, device: str | None, precision: str) -> None:
        ov = require("openvino", "running an OpenVINO model")
        if device is not None and str(device).startswith("cuda"):
            raise ValueError(f"an OpenVINO model runs on OpenVINO devices ('cpu', 'gpu', 'auto'), not {device!r}")
        core = ov.Core()
        try:
            model = core.read_model(str(path))
        except Exception as err:
            raise ExportedModelError(f"{path} is not a readable OpenVINO model: {_first_line(err)}") from None
        self.text = model.get_rt_info([METADATA_KEY]).astype(str) if model.has_rt_info([METADATA_KEY]) else None
        port = model.inputs[0] if len(model.inputs) == 1 else None
        self.input = None if port is None else (
            port.get_any_name(), str(port.get_element_type()), [str(d) for d in port.get_partial_shape()]
        )
        self.outputs = [o.get_any_name() for o in model.outputs]
        # f32 by default: on CPUs with bf16 units OpenVINO would otherwise compute in bf16 (~1% off the scores)
        config = {"INFERENCE_PRECISION_HINT": precision}
        self.compiled = core.compile_model(model, (device or "cpu").upper(), config)
        self.lock = threading.Lock()  # one infer request: calls from several threads take turns

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self.lock:
            result = self.compiled(images)
            return np.array(result[OUTPUT_NAMES[0]]), np.array(result[OUTPUT_NAMES[1]])


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


class ExportedDetector:
    """An exported file (``.onnx`` through onnxruntime, OpenVINO ``.xml``) behind a torch detector's scoring
    interface: ``score``, ``preprocess``, ``decide``, ``calibration_``, ``threshold_``, ``image_size``,
    ``batch_size``, ``name``, ``progress``; so ``omniad.predict(ExportedDetector.load(path), files, out)`` works
    as with the torch model. No training code runs.

    Attributes:
        path: the file.
        format: "onnx" or "openvino".
        metadata: what the file carries (see ``export_metadata``).
        name: the method's registered name.
        image_size: side of the square images the graph takes.
        batch_size: images per run of the graph (from the file; may be changed).
        backbone: the backbone's timm name.
        weights: where the backbone's weights came from; seed: the fit's seed (both for reports).
        calibration_: the model's ``Calibration`` (None when it had none).
        progress: show progress bars in ``omniad.predict`` (default False).
        runtime_note: one line on what scores (runtime, precision, file), stated in ``omniad.predict``'s output.
    """

    # reader threads ``omniad.predict`` uses by default: unlike torch's, the runtimes' thread pools tolerate them
    # (measured, kolektor's 150 files, 2 cores: PaDiM 56 -> 63 and PatchCore 51-57 -> 67-72 images/s with 2)
    default_readers = 2
    # what ``omniad.predict`` and the service read files as for it (``read_image``): the graph's own input type
    read_dtype = torch.uint8

    def __init__(self, path: Path, runtime: Any, metadata: dict[str, Any], calibration: Calibration | None,
                 precision: str = "f32") -> None:
        self.path = path
        self.format = "onnx" if path.suffix.lower() == ".onnx" else "openvino"
        # an INT8 graph (omniad quantize) says so in its metadata: its weights are int8 whatever the inference hint
        stored = "int8" if metadata.get("precision") == "int8" else precision
        self.runtime_note = f"{'onnxruntime' if self.format == 'onnx' else 'openvino'} {stored} ({path})"
        self.runtime = runtime
        self.metadata = metadata
        self.name: str = metadata["method"]
        self.image_size: int = metadata["image_size"]
        self.batch_size: int = metadata["batch_size"]
        self.backbone: str | None = metadata.get("backbone")
        # what reports state about a model (omniad.metrics.describe_detector), from the file
        self.weights = metadata.get("weights_source")
        self.seed = metadata["params"].get("seed")
        self.calibration_ = calibration
        self.progress = False

    @classmethod
    def load(
        cls, path: str | os.PathLike, device: str | None = None, precision: str = "f32"
    ) -> ExportedDetector:
        """Open an exported file and check its metadata.

        Args:
            path: a ``.onnx`` file or an OpenVINO ``.xml`` file (with its ``.bin`` beside it).
            device: None / "cpu" (default), "auto", "cuda" (onnxruntime with CUDA), or an OpenVINO device ("gpu").
            precision: OpenVINO's inference precision, "f32" (default: the parity promised) or "bf16" / "f16"
                (faster where the hardware has them; scores then differ from the torch model's by ~1%).

        Raises:
            ExportedModelError: the file is missing, not a model, not an omniad export, or its metadata is
                corrupt or tampered with (the message names the file).
            MissingExtraError: the runtime for the format is not installed.
        """
        file = Path(path)
        if not file.is_file():
            raise ExportedModelError(f"no exported model at {file}: the file does not exist")
        suffix = file.suffix.lower()
        if suffix == ".onnx":
            runtime: Any = _OnnxRuntime(file, device)
        elif suffix == ".xml":
            check_precision(precision)
            weights = file.with_suffix(".bin")
            if not weights.is_file():
                raise ExportedModelError(f"{file} is incomplete: its weights {weights.name} are missing")
            runtime = _OpenVinoRuntime(file, device, precision)
        else:
            raise ExportedModelError(f"{file} is not an exported model: expected a .onnx or an OpenVINO .xml file")
        metadata = read_metadata(runtime.text, file)
        _check_signature(runtime, metadata, file)
        saved = metadata.get("calibration")
        calibration = None if saved is None else _calibration(saved, metadata.get("threshold"), file)
        return cls(file, runtime, metadata, calibration, precision if suffix == ".xml" else "f32")

    # ----------------------------------------------------------------- the scoring interface
    def preprocess(self, images: Any) -> Tensor:
        """Check a batch of (B, 3, H, W) floats in [0, 1] (or uint8 0-255) and resize it to ``image_size`` (as a
        torch detector)."""
        from omniad.data.images import check_image_batch, resize_image

        return resize_image(check_image_batch(images, allow_uint8=True), self.image_size)

    def score(self, images: Tensor) -> AnomalyScores:
        """Score a batch of images.

        Args:
            images: (B, 3, H, W) floats in [0, 1] or uint8; other sizes are resized to ``image_size``, then float
                images are rounded to uint8 for the graph (exact for images read from 8-bit files).

        Returns:
            ``AnomalyScores`` on the CPU: (B,) image scores, (B, image_size, image_size) maps.
        """
        pixels = float_to_uint8(self.preprocess(images))
        size = self.image_size
        if pixels.shape[0] == 0:
            return AnomalyScores(torch.empty(0), torch.empty(0, size, size))
        step = max(1, int(self.batch_size))
        parts = [self.run(pixels[start : start + step]) for start in range(0, pixels.shape[0], step)]
        return AnomalyScores(
            torch.from_numpy(np.concatenate([p[0] for p in parts]).astype(np.float32)),
            torch.from_numpy(np.concatenate([p[1] for p in parts]).astype(np.float32)),
        )

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run the graph once on uint8 (B, H, W, 3) RGB images of the model's size: (B,) scores, (B, H, W) maps."""
        size = self.image_size
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
            kind = images.dtype if isinstance(images, np.ndarray) else type(images).__name__
            raise TypeError(f"{self.path.name} takes uint8 images (B, {size}, {size}, 3), got {kind}")
        if images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise ValueError(
                f"{self.path.name} takes uint8 RGB images of shape (B, {size}, {size}, 3), got {images.shape}"
            )
        return self.runtime.run(np.ascontiguousarray(images))

    @property
    def threshold_(self) -> float:
        """The calibrated decision threshold (NaN when the model has no calibration)."""
        return float("nan") if self.calibration_ is None else self.calibration_.threshold

    def decide(self, image_scores: Any) -> np.ndarray:
        """Boolean decisions for image scores at the calibrated threshold (``Calibration.decide``)."""
        if self.calibration_ is None:
            raise ValueError(f"{self.path} has no calibrated threshold: give one (predict(..., threshold=...))")
        return self.calibration_.decide(image_scores)

    def predict(self, images: Tensor) -> Tensor:
        """Boolean decisions at the calibrated threshold for a batch of images."""
        return torch.from_numpy(self.decide(self.score(images).image_scores))

    def get_params(self) -> dict[str, Any]:
        """The hyper-parameters the model was fitted with (from the file)."""
        return dict(self.metadata["params"])

    def __repr__(self) -> str:
        return f"ExportedDetector({str(self.path)!r}, method={self.name!r}, format={self.format!r})"


def read_metadata(text: str | None, file: Path) -> dict[str, Any]:
    """The JSON an exported file carries under ``omniad``, checked for format, version and the fields used."""
    if text is None:
        raise ExportedModelError(f"{file} is not an omniad export: it carries no '{METADATA_KEY}' metadata")
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as err:
        raise ExportedModelError(f"{file}: its '{METADATA_KEY}' metadata is not valid JSON: {err}") from None
    if not isinstance(metadata, dict) or metadata.get("format") != EXPORT_FORMAT:
        raise ExportedModelError(f"{file} is not an omniad export (its metadata's format is not {EXPORT_FORMAT!r})")
    if metadata.get("format_version") != EXPORT_FORMAT_VERSION:
        raise ExportedModelError(
            f"{file} has export format {metadata.get('format_version')}; this omniad reads {EXPORT_FORMAT_VERSION}"
        )
    for key, kind in (("method", str), ("image_size", int), ("batch_size", int), ("params", dict)):
        value = metadata.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 1):
            raise ExportedModelError(f"{file}: its metadata's {key!r} is missing or invalid ({value!r})")
    return metadata


def _check_signature(runtime: Any, metadata: dict[str, Any], file: Path) -> None:
    size = metadata["image_size"]
    name, kind, shape = runtime.input or (None, None, None)
    dims = [str(d) for d in shape or []]
    if name != INPUT_NAME or "uint8" not in str(kind).lower() or dims[1:] != [str(size), str(size), "3"]:
        raise ExportedModelError(
            f"{file}: the graph's input is {name!r} {kind} {shape}; an omniad export takes '{INPUT_NAME}' uint8 "
            f"(batch, {size}, {size}, 3) as its metadata says"
        )
    if list(runtime.outputs) != list(OUTPUT_NAMES):
        raise ExportedModelError(f"{file}: the graph's outputs are {runtime.outputs}, expected {list(OUTPUT_NAMES)}")


def _calibration(saved: Any, threshold: Any, file: Path) -> Calibration:
    try:
        calibration = Calibration.from_dict(saved, f"{file}: calibration")
    except ValueError as err:
        raise ExportedModelError(str(err)) from None
    if not (isinstance(threshold, (int, float)) and math.isclose(threshold, calibration.threshold, rel_tol=1e-12)):
        raise ExportedModelError(
            f"{file}: its metadata's threshold {threshold!r} is not its calibration's ({calibration.threshold}); "
            "the file was edited or corrupted"
        )
    return calibration


def load_model(path: str | os.PathLike, device: str | None = None) -> Any:
    """A model from any file omniad writes: a bundle folder (``omniad fit``) gives the torch detector, a ``.onnx``
    or OpenVINO ``.xml`` file (``omniad export``) an ``ExportedDetector``. Both score and predict alike. (With a
    runtime to choose: ``omniad.fastpath.load_model``, which ``omniad.load_model`` is.)

    Raises:
        BundleError: not a model (``ExportedModelError`` for exported files), naming the path.
    """
    from omniad.io import load_detector

    target = Path(path)
    if target.suffix.lower() in (".onnx", ".xml") and not target.is_dir():
        return ExportedDetector.load(target, device=device)
    if target.is_file():
        raise BundleError(
            f"{target} is not a model: give a model folder written by `omniad fit`, or a .onnx / OpenVINO .xml "
            "file written by `omniad export`"
        )
    return load_detector(target, device=device)


__all__ = [
    "DEFAULT_OPSET",
    "FORMATS",
    "ExportError",
    "ExportedDetector",
    "ExportedModelError",
    "MissingExtraError",
    "ScoringGraph",
    "export_detector",
    "export_metadata",
    "float_to_uint8",
    "load_model",
    "parity",
    "probe_images",
    "uint8_to_float",
]
