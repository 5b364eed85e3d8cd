"""BaseDetector: what every detector shares — hyper-parameters, seeding, the calibrated threshold, scoring in
batches, save/load. A method subclasses it and writes ``_fit``, ``_score``, ``_build`` and ``_modules``."""

from __future__ import annotations

import inspect
import math
import time
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from omniad.data.sources import as_image_dataset, split_holdout
from omniad.runtime import resolve_device, seed_everything
from omniad.types import AnomalyScores


class NotFittedError(RuntimeError):
    """Raised when a detector is used before ``fit`` or ``load``."""


def resolve_preset(presets: dict[str, dict[str, Any]], preset: str, values: dict[str, Any]) -> dict[str, Any]:
    """Fill every None in ``values`` from ``presets[preset]``; explicit values win."""
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; use one of {sorted(presets)}")
    chosen = presets[preset]
    return {k: (chosen[k] if v is None and k in chosen else v) for k, v in values.items()}


class BaseDetector:
    """Shared behaviour of every omniad detector.

    Args:
        backbone: timm model name of the frozen feature extractor.
        weights: where the backbone's weights come from: "auto" (timm's hub cache, then omniad's offline
            weights), "timm", "offline", "random", or the path of a safetensors / torch state-dict file.
        image_size: side of the square images the detector is trained and evaluated on.
        device: "auto" (CUDA when present, else CPU), "cpu", "cuda", "cuda:1", ...
        seed: makes fitting repeatable.
        batch_size: images per batch for the backbone and for scoring.
        calibration_fraction: share of the training images held out (never trained on) to calibrate the
            decision threshold; 0 disables calibration.
        target_far: false-alarm rate on held-out normal images that the calibrated threshold aims at.
        progress: show progress bars.
    """

    name: str = "base"
    # the method's settings for the contract test on the tiny synthetic set (every method declares its own)
    test_params: dict[str, Any] = {}

    def __init__(
        self,
        *,
        backbone: str = "tf_efficientnet_lite0",
        weights: str = "auto",
        image_size: int = 256,
        device: str = "auto",
        seed: int = 0,
        batch_size: int = 16,
        calibration_fraction: float = 0.1,
        target_far: float = 0.01,
        progress: bool = True,
    ) -> None:
        self.backbone = backbone
        self.weights = weights
        self.image_size = image_size
        self.device = device
        self.seed = seed
        self.batch_size = batch_size
        self.calibration_fraction = calibration_fraction
        self.target_far = target_far
        self.progress = progress
        self._loading = False  # True while ``load`` rebuilds modules: skip weight resolution

    # ----------------------------------------------------------------- hyper-parameters
    @classmethod
    def param_names(cls) -> list[str]:
        """Keyword hyper-parameters accepted by ``__init__`` across the class hierarchy."""
        names: list[str] = []
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None:
                continue
            for p in inspect.signature(init).parameters.values():
                if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self" and p.name not in names:
                    names.append(p.name)
        return names

    @classmethod
    def param_defaults(cls) -> dict[str, Any]:
        """Each hyper-parameter with its default value."""
        defaults: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            init = klass.__dict__.get("__init__")
            if init is None:
                continue
            for p in inspect.signature(init).parameters.values():
                if p.name != "self" and p.default is not inspect.Parameter.empty:
                    defaults[p.name] = p.default
        return {name: defaults.get(name) for name in cls.param_names()}

    @classmethod
    def param_help(cls) -> dict[str, str]:
        """One line of help per hyper-parameter, read from the "Args:" sections of the class docstrings."""
        helps: dict[str, str] = {}
        for klass in reversed(cls.__mro__):
            helps.update(_docstring_args(klass.__doc__ or ""))
        return {name: helps.get(name, "") for name in cls.param_names()}

    def get_params(self) -> dict[str, Any]:
        """The hyper-parameters this detector was created with (JSON-able)."""
        return {name: _jsonable(getattr(self, name)) for name in self.param_names()}

    def __repr__(self) -> str:
        defaults = self.param_defaults()
        changed = {k: v for k, v in self.get_params().items() if defaults.get(k) != v}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in changed.items())})"

    # ----------------------------------------------------------------- fitting
    def fit(self, data: Any) -> BaseDetector:
        """Train on normal images of every category at once. Labels and categories are never read.

        Args:
            data: a dataset of ``Sample`` (e.g. ``omniad.data.MVTecDataset(split="train")``), a sequence of
                (3, H, W) tensors, or one (N, 3, H, W) tensor, with values in [0, 1].

        Returns:
            self, fitted.
        """
        started = time.perf_counter()
        seed_everything(self.seed)
        self.device_ = resolve_device(self.device)
        images = as_image_dataset(data)
        if len(images) == 0:
            raise ValueError("fit needs at least one training image; the data given is empty")
        train, holdout = split_holdout(images, self.calibration_fraction, self.seed)
        self._fit(train)
        self.fitted_ = True
        self.threshold_ = float("nan")
        if holdout is not None:
            self.calibrate(holdout)
        self.fit_seconds_ = time.perf_counter() - started  # whole fit, calibration included (for reports)
        return self

    def calibrate(self, normal_images: Any, target_far: float | None = None) -> float:
        """Set ``threshold_`` so that a share ``target_far`` of these normal images would be flagged."""
        from omniad.calibration import threshold_at_far

        self._check_fitted()
        far = self.target_far if target_far is None else target_far
        scores = self.score_dataset(as_image_dataset(normal_images)).image_scores
        self.calibration_scores_ = scores
        self.threshold_ = threshold_at_far(scores.numpy(), far)
        return self.threshold_

    def _fit(self, images: torch.utils.data.Dataset) -> None:
        """Train on a dataset of (3, H, W) image tensors. Implemented by each method."""
        raise NotImplementedError

    # ----------------------------------------------------------------- scoring
    @torch.no_grad()
    def score(self, images: Tensor) -> AnomalyScores:
        """Score a batch of images.

        Args:
            images: (B, 3, H, W) floats in [0, 1].

        Returns:
            ``AnomalyScores`` on the CPU: (B,) image scores and (B, H, W) maps; higher = more anomalous.
        """
        self._check_fitted()
        images = _check_images(images)
        out_scores, out_maps = [], []
        for start in range(0, images.shape[0], self.batch_size):
            batch = images[start : start + self.batch_size].to(self.device_)
            result = self._score(batch)
            out_scores.append(result.image_scores.float().cpu())
            out_maps.append(result.anomaly_maps.float().cpu())
        return AnomalyScores(torch.cat(out_scores), torch.cat(out_maps))

    def score_dataset(self, data: Any, desc: str = "scoring") -> AnomalyScores:
        """Score every image of a dataset (of ``Sample`` or tensors) in batches, with a progress bar."""
        from omniad.data.sources import iterate_batches

        parts = [self.score(batch) for batch in iterate_batches(data, self.batch_size, self.progress, desc)]
        if not parts:
            return AnomalyScores(torch.empty(0), torch.empty(0, self.image_size, self.image_size))
        return AnomalyScores(torch.cat([p.image_scores for p in parts]), torch.cat([p.anomaly_maps for p in parts]))

    def _score(self, images: Tensor) -> AnomalyScores:
        """Score one batch already on ``self.device_``. Implemented by each method."""
        raise NotImplementedError

    def predict(self, images: Tensor) -> Tensor:
        """Boolean decisions at the calibrated threshold."""
        self._check_fitted()
        if not math.isfinite(getattr(self, "threshold_", float("nan"))):
            raise NotFittedError(
                "this detector has no calibrated threshold: fit with calibration_fraction > 0 or call calibrate()"
            )
        return self.score(images).image_scores > self.threshold_

    def _check_fitted(self) -> None:
        if not getattr(self, "fitted_", False):
            raise NotFittedError(f"{type(self).__name__} is not fitted yet: call fit(data) or omniad.load_detector")

    # ----------------------------------------------------------------- persistence
    def _modules(self) -> dict[str, nn.Module]:
        """The modules whose state makes up the fitted model (saved and restored by name)."""
        raise NotImplementedError

    def _meta(self) -> dict[str, Any]:
        """JSON-able facts learned in ``fit`` that ``_build`` needs to recreate the modules' shapes."""
        return {}

    def _build(self, meta: dict[str, Any]) -> None:
        """Create the (untrained) modules from the hyper-parameters and ``meta``; used by ``load``."""
        raise NotImplementedError

    def save(self, path: str) -> None:
        """Write the fitted model to the folder ``path`` atomically (config.json + weights.safetensors)."""
        from omniad.io import save_detector

        save_detector(self, path)

    def state_tensors(self) -> dict[str, Tensor]:
        """Every learned tensor, keyed ``<module>.<param>``."""
        self._check_fitted()
        tensors: dict[str, Tensor] = {}
        for prefix, module in self._modules().items():
            for key, value in module.state_dict().items():
                tensors[f"{prefix}.{key}"] = value
        return tensors

    def load_state(self, meta: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        """Rebuild the modules from ``meta`` and fill them with ``tensors`` (inverse of ``state_tensors``)."""
        self.device_ = resolve_device(self.device)
        self._loading = True
        try:
            self._build(meta)
        finally:
            self._loading = False
        for prefix, module in self._modules().items():
            own = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
            module.load_state_dict(own, strict=True)
            module.to(self.device_).eval()
        self.fitted_ = True

    def fitted_meta(self) -> dict[str, Any]:
        """Everything besides tensors that a saved bundle carries."""
        meta = dict(self._meta())
        meta["threshold"] = getattr(self, "threshold_", float("nan"))
        return meta


def _docstring_args(doc: str) -> dict[str, str]:
    """Parse a Google-style "Args:" section into {name: description} (continuation lines joined)."""
    out: dict[str, str] = {}
    lines = doc.expandtabs().splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Args:")
    except StopIteration:
        return out
    indent = None
    current = None
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        width = len(line) - len(line.lstrip())
        if indent is None:
            indent = width
        if width < indent:
            break
        if width == indent and ":" in line:
            name, _, text = line.strip().partition(":")
            current = name.strip().lstrip("*")
            out[current] = text.strip()
        elif current is not None:
            out[current] += " " + line.strip()
    return out


def _check_images(images: Any) -> Tensor:
    if not isinstance(images, Tensor):
        raise TypeError(f"score expects a (B, 3, H, W) float tensor, got {type(images).__name__}")
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"score expects images of shape (B, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"score expects float images in [0, 1], got dtype {images.dtype}")
    return images


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
