"""BaseDetector: the one lifecycle every detector uses.

    fit(data)      = resolve hyper-parameters -> hold out the calibration share -> extract -> fit_features
                     -> calibrate
    score(images)  = pre-process (checks, resize to image_size) -> features -> score_features (raw maps)
                     -> post-process (up-sample, Gaussian sigma, pooling) -> AnomalyScores

Two input modes live here too, so that every method has them: an (height, width) ``image_size`` (aspect kept,
padding cut off the maps) and tiled inspection (``tile_size``: every tile a training image, tile maps stitched).

A method writes ``features`` (what its frozen part computes for a batch; a backbone's stage maps by default),
``fit_features`` (training on those features, cached for the whole set) and ``score_features`` (the raw
anomaly map), plus ``modules``/``meta``/``build`` for save and load. Everything else — seeding, devices, the
hold-out, the feature cache, batching, the score tail, the one ``Calibration``, persistence — lives here once.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Subset

from omniad.backbone import Backbone
from omniad.calibration import Calibration
from omniad.data.images import KeepAspect, check_image_batch, letterbox, resize_image
from omniad.data.sources import as_image_dataset, holdout_size, iterate_batches, split_holdout
from omniad.distributed import gather_shards, is_main, shard, world
from omniad.features import FeatureCache, Features, feature_count, feature_slice, feature_to
from omniad.holdout import pooled_features, stratified_holdout
from omniad.memory import PeakMemory
from omniad.params import (
    FRACTION,
    NON_NEGATIVE,
    POSITIVE_INT,
    Each,
    Either,
    Interval,
    Options,
    as_namespace,
    check_params,
    docstring_args,
    fill_params,
    init_params,
)
from omniad.postprocess import POOLINGS, gaussian_blur, image_score, to_scores, upsample
from omniad.runtime import resolve_device, seed_everything
from omniad.tiling import Stitcher, TileDataset, box_batches, cut_tiles, tile_boxes, to_tiling_size
from omniad.types import AnomalyScores

# the hyper-parameters of the score tail: they do not touch training
POSTPROCESSING = ("sigma", "image_pooling", "top_fraction", "pool_kernel")


class RawScores(NamedTuple):
    """What ``score_features`` returns when the method computes its image scores itself (e.g. PatchCore's
    re-weighted score): the raw maps still go through the score tail, the image scores are kept as they are."""

    maps: Tensor  # (B, h, w)
    image_scores: Tensor  # (B,)


class NotFittedError(RuntimeError):
    """Raised when a detector is used before ``fit`` or ``load``."""


class FeatureStream:
    """Features computed batch by batch each time it is iterated, for methods whose features of a whole training
    set would not fit in memory (``cache_features = False``)."""

    def __init__(self, detector: BaseDetector, images: Any, desc: str) -> None:
        self.detector, self.images, self.desc = detector, images, desc

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[Features]:
        d = self.detector
        for batch in iterate_batches(self.images, d.batch_size, d.progress and is_main(), self.desc):
            yield d.features(batch.to(d.device_))


class BaseDetector:
    """Shared behaviour of every omniad detector.

    Args:
        backbone: timm model name of the frozen feature extractor.
        weights: where the backbone's weights come from: "auto" (timm's hub cache, then omniad's offline
            weights), "timm", "offline", "random", or the path of a safetensors / torch state-dict file.
        image_size: side of the square images the detector is trained and evaluated on (every image squashed to
            it), or a (height, width) pair: each image is resized to fit inside it keeping its aspect ratio and
            zero-padded to it; the padding is cut off the maps (never pooled, never in pixel metrics). With
            tiling: the side each tile is resized to for the network (keep it equal to ``tile_size``).
        device: "auto" (CUDA when present, else CPU), "cpu", "cuda", "cuda:1", ...
        seed: makes fitting repeatable.
        batch_size: images per batch for the backbone and for scoring.
        calibration_fraction: share of the training images held out (never trained on) to calibrate the
            decision threshold; 0 disables calibration.
        calibration_strata: the held-out share is drawn from each of this many clusters of the training images
            (k-means over pooled backbone features of thumbnails, ``omniad.holdout``), so every kind of image of
            the line is in the calibration, and ``calibration_.group_rates()`` gives each cluster's false-alarm
            rate; 0 = a plain random share.
        target_far: false-alarm rate on held-out normal images that the calibrated threshold aims at.
        sigma: Gaussian smoothing of the up-sampled map (None: the method's default; the protocol's is 4).
        image_pooling: image score from the map: "top1" (mean of the top ``top_fraction``), "max", "maxpool"
            (max of the ``pool_kernel``-averaged map) or "mean" (of the whole map); None: the method's default.
        top_fraction: share of the highest map values averaged by "top1" pooling (protocol: 0.01, the top 1%).
        pool_kernel: averaging window of "maxpool" pooling (UniAD: 16).
        progress: show progress bars.
        tile_size: tiled inspection (None: off): each image, at its own resolution, is cut into ``tile_size`` x
            ``tile_size`` tiles, each resized to ``image_size`` for the network (equal sides: native resolution;
            ``tile_size`` = 2 x ``image_size``: half of it, at a quarter of the tiles); every tile is a training
            image of the one model, and at test time the tile maps are stitched (overlaps averaged) into a map of
            the image's own size, which is smoothed and pooled.
        tile_stride: pixels between tiles (None: half a tile, so tiles overlap by half).
    """

    name: ClassVar[str] = "base"
    # the method's settings for the contract test on the tiny synthetic set (every method declares its own)
    test_params: ClassVar[dict[str, Any]] = {}
    # the image AUROC the contract test asks of those settings with real ImageNet features
    test_min_auroc: ClassVar[float] = 0.7
    # named sets of values for the parameters left at None (methods with a ``preset`` parameter)
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    # values of the parameters still None after the preset: each method's post-processing defaults
    defaults: ClassVar[dict[str, Any]] = {"sigma": 4.0, "image_pooling": "top1"}
    # parameter -> Interval / Options / Each; merged along the class hierarchy
    constraints: ClassVar[dict[str, Any]] = {
        "image_size": Either(Interval(16, None, integer=True), Each(Interval(16, None, integer=True), length=2)),
        "tile_size": Interval(16, None, integer=True, allow_none=True),
        "tile_stride": Interval(1, None, integer=True, allow_none=True),
        "batch_size": POSITIVE_INT,
        "seed": Interval(0, None, integer=True),
        "calibration_fraction": FRACTION,
        "calibration_strata": Interval(0, None, integer=True),
        "target_far": FRACTION,
        "sigma": NON_NEGATIVE,
        "image_pooling": Options(POOLINGS),
        "top_fraction": Interval(0.0, 1.0, low_open=True),
        "pool_kernel": POSITIVE_INT,
    }
    # False: ``extract`` streams batches instead of caching the whole set (features too large to hold)
    cache_features: ClassVar[bool] = True
    # fewest images one ``score`` call takes (2 for methods that score the images of a call against each other)
    min_score_batch: ClassVar[int] = 1
    # False: the method scores whole square images only (no tiling, no (height, width) image_size)
    supports_input_modes: ClassVar[bool] = True

    def __init__(
        self,
        *,
        backbone: str = "tf_efficientnet_lite0",
        weights: str = "auto",
        image_size: int | tuple[int, int] = 256,
        device: str = "auto",
        seed: int = 0,
        batch_size: int = 16,
        calibration_fraction: float = 0.1,
        calibration_strata: int = 8,
        target_far: float = 0.01,
        sigma: float | None = None,
        image_pooling: str | None = None,
        top_fraction: float = 0.01,
        pool_kernel: int = 16,
        progress: bool = True,
        tile_size: int | None = None,
        tile_stride: int | None = None,
    ) -> None:
        self.backbone = backbone
        self.weights = weights
        self.image_size = image_size
        self.device = device
        self.seed = seed
        self.batch_size = batch_size
        self.calibration_fraction = calibration_fraction
        self.calibration_strata = calibration_strata
        self.target_far = target_far
        self.sigma = sigma
        self.image_pooling = image_pooling
        self.top_fraction = top_fraction
        self.pool_kernel = pool_kernel
        self.progress = progress
        self.tile_size = tile_size
        self.tile_stride = tile_stride

    # ----------------------------------------------------------------- hyper-parameters (scikit-learn style)
    @classmethod
    def param_names(cls) -> list[str]:
        """Keyword hyper-parameters accepted by ``__init__`` across the class hierarchy."""
        return [p.name for p in init_params(cls)]

    @classmethod
    def param_defaults(cls) -> dict[str, Any]:
        """Each hyper-parameter with its default value."""
        return {p.name: (None if p.default is p.empty else p.default) for p in init_params(cls)}

    @classmethod
    def param_help(cls) -> dict[str, str]:
        """One line of help per hyper-parameter, read from the "Args:" sections of the class docstrings."""
        helps: dict[str, str] = {}
        for klass in reversed(cls.__mro__):
            helps.update(docstring_args(klass.__doc__ or ""))
        return {name: helps.get(name, "") for name in cls.param_names()}

    @classmethod
    def all_constraints(cls) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            merged.update(klass.__dict__.get("constraints", {}))
        return merged

    def get_params(self) -> dict[str, Any]:
        """The hyper-parameters as given to ``__init__`` (JSON-able: tuples become lists)."""
        return {name: _jsonable(getattr(self, name)) for name in self.param_names()}

    def set_params(self, **params: Any) -> BaseDetector:
        """Change hyper-parameters; unknown names are refused. They take effect at the next ``fit``, except the
        post-processing ones (``POSTPROCESSING``) on a fitted detector, which take effect at once: they change
        the scores, so the calibration is dropped (call ``calibrate`` again)."""
        unknown = sorted(set(params) - set(self.param_names()))
        if unknown:
            raise ValueError(f"{self.name}: unknown parameters {unknown}; known: {', '.join(self.param_names())}")
        for name, value in params.items():
            setattr(self, name, value)
        if getattr(self, "fitted_", False) and set(params) & set(POSTPROCESSING):
            resolved = self.resolved_params()
            for name in POSTPROCESSING:
                setattr(self.resolved_, name, resolved[name])
            self.calibration_ = None
        return self

    def clone(self) -> BaseDetector:
        """An unfitted detector with the same hyper-parameters."""
        params = {k: copy.deepcopy(getattr(self, k)) for k in self.param_names()}
        return type(self)(**params)

    def resolved_params(self) -> dict[str, Any]:
        """Every hyper-parameter with its effective value: presets and defaults filled in, all validated."""
        values = {name: getattr(self, name) for name in self.param_names()}
        constraints = self.all_constraints()
        # checked before derive_params (which may read any value) and after (what it derived obeys them too)
        values = check_params(fill_params(values, self.presets, self.defaults, self.name), constraints, self.name,
                              skip_none=True)
        values = check_params(self.derive_params(values), constraints, self.name)
        if not (self.supports_input_modes or whole_square_input(values["image_size"], values.get("tile_size"))):
            raise ValueError(f"{self.name} scores whole square images only: tile_size and an (height, width) "
                             "image_size are not supported")
        return _resolve_tiling(values, self.name)

    def derive_params(self, values: dict[str, Any]) -> dict[str, Any]:
        """Hook: values that follow from others after resolution (e.g. depths fitted to the number of stages). It
        gets checked values (sequences as tuples), except those still None, which it may fill."""
        return values

    def __repr__(self) -> str:
        defaults = self.param_defaults()
        changed = {k: v for k, v in self.get_params().items() if _jsonable(defaults.get(k)) != v}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in changed.items())})"

    # ----------------------------------------------------------------- the lifecycle
    def prepare(self) -> BaseDetector:
        """Resolve the hyper-parameters, pick the device and build the frozen part (idempotent within a fit)."""
        self._set_up(pretrained=True)
        return self

    def _set_up(self, pretrained: bool) -> None:
        """What fit (``prepare``) and load (``rebuild``) share: resolved parameters, device, frozen part."""
        self.resolved_ = as_namespace(self.resolved_params())
        self.device_ = resolve_device(self.device)
        if self.device_.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {self.device!r} was asked for, but this machine has no CUDA device")
        self.build_frozen(pretrained)

    @property
    def input_hw(self) -> tuple[int, int]:
        """(height, width) of the network's input: ``image_size`` as a pair."""
        size = self.image_size
        return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))

    @property
    def read_size(self) -> Any:
        """The size readers should give images and masks for this detector (``MVTecDataset(image_size=...)``):
        ``image_size`` when square, ``KeepAspect`` for an (height, width) pair (maps come at the content's
        size), None when tiled (each image at its own size, as are its maps)."""
        if self.tile_size is not None:
            return None
        if whole_square_input(self.image_size, self.tile_size):
            return int(self.image_size)
        return KeepAspect(*self.input_hw)

    def build_frozen(self, pretrained: bool) -> None:
        """Build the frozen feature extractor (``backbone_``); ``pretrained=False`` when a bundle will fill it."""
        self.backbone_ = Backbone(self.backbone, self.resolved_.stages, self.weights if pretrained else "random")
        self.backbone_.to(self.device_)

    def fit(self, data: Any) -> BaseDetector:
        """Train on normal images of every category at once. Labels and categories are never read.

        Args:
            data: a dataset of ``Sample`` (e.g. ``omniad.data.MVTecDataset(split="train")``), a sequence of
                (3, H, W) tensors, or one (N, 3, H, W) tensor, with values in [0, 1].

        Returns:
            self, fitted.
        """
        started = time.perf_counter()
        with PeakMemory() as peak:
            seed_everything(self.seed)
            self.fitted_ = False
            self.calibration_ = None
            self.prepare()
            images = as_image_dataset(data, self.read_size)
            if len(images) == 0:
                raise ValueError("fit needs at least one training image; the data given is empty")
            train, holdout, groups = self.split_calibration(images)
            self.fit_features(self.extract(train))
            if holdout is not None:
                share = f"{self.calibration_fraction:g} of the {len(images)} training images"
                if groups is not None:
                    share += f", drawn from each of {len(set(groups.tolist()))} clusters of them"
                self.calibrate(holdout, source=f"held out from training: {share}, never trained on", groups=groups)
        self.fit_seconds_ = time.perf_counter() - started  # whole fit, calibration included (for reports)
        self.fit_peak_memory_mb_ = peak.bytes / 2**20  # the process's peak resident memory during the fit
        return self

    def split_calibration(self, images: Any) -> tuple[Any, Any, np.ndarray | None]:
        """(training images, held-out normals or None, their clusters or None): ``calibration_fraction`` of
        the images, drawn per cluster (``calibration_strata``, ``omniad.holdout``) or at random."""
        fraction, strata = self.calibration_fraction, self.calibration_strata
        if not strata or not holdout_size(len(images), fraction):
            return (*split_holdout(images, fraction, self.seed), None)
        backbone, device = self.holdout_backbone()
        # several processes: each pools its shard and every rank clusters the same gathered rows (one split)
        local = images if world()[1] == 1 else Subset(images, shard(len(images)))
        features = pooled_features(backbone, local, self.batch_size, device, self.progress and is_main())
        return stratified_holdout(images, fraction, self.seed, gather_shards(features, len(images)), strata)

    def holdout_backbone(self) -> tuple[Backbone | None, Any]:
        """The frozen backbone (and its device) whose pooled thumbnails cluster the training images for the
        hold-out (``split_calibration``); None: the thumbnails' colour means."""
        return getattr(self, "backbone_", None), getattr(self, "device_", "cpu")

    def extract(self, data: Any) -> Features | FeatureStream:
        """What the method trains on: ``features`` of every image, computed once (on the CPU), or a
        ``FeatureStream`` for methods that do not cache. ``fit_features(extract(x))`` is ``fit(x)`` without the
        hold-out, so one cache can train several models."""
        if not hasattr(self, "resolved_"):
            seed_everything(self.seed)
            self.prepare()
        images = self.training_inputs(data)
        if len(images) == 0:
            raise ValueError("no images to extract features from")
        # several processes: each extracts a strided shard (a FeatureStream streams its shard)
        local = images if world()[1] == 1 else Subset(images, shard(len(images)))
        if not self.cache_features:
            return FeatureStream(self, local, "backbone features")
        writer = FeatureCache(len(local))  # above the memory budget the cache is memory-mapped on disk
        with torch.no_grad():
            for batch in iterate_batches(local, self.batch_size, self.progress and is_main(), "backbone features"):
                writer.write(feature_to(self.features(batch.to(self.device_)), "cpu", torch.float32))
        cache = writer.result()
        if world()[1] == 1:
            return cache
        if isinstance(cache, Tensor):  # every rank gets the whole cache, in the original order
            return gather_shards(cache, len(images))
        return [gather_shards(part, len(images)) for part in cache]

    def training_inputs(self, data: Any) -> Any:
        """What the network trains on, as a dataset of (3, h, w) tensors: the images at ``image_size``; padded
        to it for an (height, width) ``image_size``; every tile of every image when tiled."""
        images = as_image_dataset(data, self.read_size)
        if self.tile_size is not None:
            return _Resized(TileDataset(images, int(self.tile_size), int(self.resolved_.tile_stride)), self.input_hw)
        if not isinstance(self.image_size, int):
            return _Resized(images, self.input_hw, letterboxed=True)
        return images

    def fit_features(self, features: Features | FeatureStream, **options: Any) -> BaseDetector:
        """Train on features from ``extract`` (seeded here, so the model is the same however they were made)."""
        if not hasattr(self, "resolved_"):
            self.prepare()
        seed_everything(self.seed)
        self.fitted_ = False
        self.calibration_ = None
        self.train_features(features, **options)
        self.fitted_ = True
        return self

    def features(self, images: Tensor) -> Features:
        """Frozen features of a batch of (B, 3, H, W) images on ``device_``; the backbone's stage maps by default."""
        return self.backbone_(images)

    def train_features(self, features: Features | FeatureStream, **options: Any) -> None:
        """The method's training on cached features. Implemented by each method."""
        raise NotImplementedError

    def score_features(self, features: Features) -> Tensor | RawScores:
        """(B, h, w) raw anomaly maps of one batch of features on ``device_`` (or ``RawScores`` with the method's
        own image scores). Implemented by each method."""
        raise NotImplementedError

    # ----------------------------------------------------------------- scoring
    def postprocess(
        self, raw: Tensor | RawScores, size: tuple[int, int], crop: tuple[int, int] | None = None
    ) -> AnomalyScores:
        """The score tail: up-sample raw maps to ``size``, keep the top-left ``crop`` (the content of a padded
        input), smooth, pool the image scores (unless the method gave them: ``RawScores``)."""
        r = self.resolved_
        if isinstance(raw, RawScores):
            return AnomalyScores(raw.image_scores, to_scores(raw.maps, size, r.sigma, "max", crop=crop)[1])
        scores, maps = to_scores(raw, size, r.sigma, r.image_pooling, r.top_fraction, r.pool_kernel, crop)
        return AnomalyScores(scores, maps)

    def preprocess(self, images: Any) -> Tensor:
        """Check a batch and resize it to ``image_size`` (the same bilinear, antialiased resize as the readers;
        for an (height, width) ``image_size``: fitted inside it, aspect kept, zero-padded)."""
        images = check_image_batch(images)
        if isinstance(self.image_size, int):
            return resize_image(images, self.image_size)
        return letterbox(images, *self.input_hw)[0]

    @torch.inference_mode()  # scores never need autograd: skip its bookkeeping entirely (no_grad keeps some)
    def score(self, images: Tensor) -> AnomalyScores:
        """Score a batch of images.

        Args:
            images: (B, 3, H, W) floats in [0, 1]; other sizes are resized to ``image_size``.

        Returns:
            ``AnomalyScores`` on the CPU: (B,) image scores and (B, h, w) maps; higher = more anomalous. The maps
            are (image_size, image_size) for a square ``image_size``, the content's size (aspect kept, no padding)
            for an (height, width) one, and the images' own size when tiled.
        """
        self._check_fitted()
        if self.tile_size is not None:
            return self._score_tiled(check_image_batch(images))
        images = check_image_batch(images)
        content = None if isinstance(self.image_size, int) else KeepAspect(*self.input_hw).size_of(*images.shape[-2:])
        images = self.preprocess(images)
        chunks = (chunk.to(self.device_) for chunk in images.split(self.batch_size))
        parts = [self.score_batch(chunk) if content is None else self.score_batch(chunk, content) for chunk in chunks]
        return concat_scores(parts)

    def _score_tiled(self, images: Tensor) -> AnomalyScores:
        """Each image cut into tiles scored ``batch_size`` at a time (memory: one batch of tiles plus the stitched
        map), tile maps stitched, then smoothed and pooled as one map. A method's own image scores
        (``RawScores``) become the highest of its tiles'."""
        r, tile = self.resolved_, int(self.tile_size)
        scores, maps = [], []
        for index, image in enumerate(images):
            own_size = tuple(int(n) for n in image.shape[-2:])
            image = to_tiling_size(image, tile)  # a small image up-sampled to fill a tile
            height, width = image.shape[-2:]
            boxes = tile_boxes(int(height), int(width), tile, int(r.tile_stride))
            stitcher = Stitcher(height, width, tile, self.device_)
            tile_scores = []
            batches = box_batches(boxes, self.batch_size)
            if self.progress and len(boxes) > 4 * self.batch_size:  # an image of many tiles shows its own progress
                from tqdm.auto import tqdm

                total = -(-len(boxes) // self.batch_size)
                batches = tqdm(batches, total=total, desc=f"tiles of image {index + 1}", unit="batch", leave=False)
            for run in batches:
                inputs = resize_image(cut_tiles(image, run, tile), self.input_hw).to(self.device_)
                raw = self.score_features(self.features(inputs))
                if isinstance(raw, RawScores):
                    tile_scores.append(raw.image_scores.float())
                    raw = raw.maps
                stitcher.add(upsample(raw.float(), (tile, tile)), run)
            stitched = gaussian_blur(upsample(stitcher.result()[None], own_size), r.sigma)
            if tile_scores:
                scores.append(torch.cat(tile_scores).max()[None])
            else:
                scores.append(image_score(stitched, r.image_pooling, r.top_fraction, r.pool_kernel))
            maps.append(stitched.cpu())
        return AnomalyScores(torch.cat(scores).float().cpu(), torch.cat(maps))

    def score_batch(self, images: Tensor, crop: tuple[int, int] | None = None) -> AnomalyScores:
        """Scores of one pre-processed batch already on ``device_`` (left there): features -> raw maps -> tail
        (``crop``: the content of padded images, see ``postprocess``)."""
        return self.postprocess(self.score_features(self.features(images)), tuple(images.shape[-2:]), crop)

    @torch.no_grad()
    def score_cached(self, features: Features) -> AnomalyScores:
        """Scores of features from ``extract`` (the numbers ``score`` gives on their images), in batches (for
        tiled or padded inputs: of the network's inputs, tiles or padded images, uncropped)."""
        self._check_fitted()
        size = self.input_hw
        parts = []
        for start in range(0, feature_count(features), self.batch_size):
            chunk = feature_to(feature_slice(features, start, start + self.batch_size), self.device_, torch.float32)
            parts.append(self.postprocess(self.score_features(chunk), size))
        return concat_scores(parts)

    def score_dataset(self, data: Any, desc: str = "scoring") -> AnomalyScores:
        """Score every image of a dataset (of ``Sample`` or tensors) in batches, with a progress bar. The maps are
        one (N, h, w) tensor, or a list of N (h, w) maps when their sizes differ (tiled, or aspect kept)."""
        parts = [
            self.score(batch)
            for batch in iterate_batches(as_image_dataset(data, self.read_size), self.batch_size, self.progress, desc)
        ]
        if not parts:
            return AnomalyScores(torch.empty(0), torch.empty(0, *self.input_hw))
        return concat_scores(parts)

    # ----------------------------------------------------------------- calibration
    def calibrate(self, normal_images: Any, target_far: float | None = None, source: str | None = None,
                  groups: Any = None) -> Calibration:
        """Set the decision rule (``calibration_``) so that a share ``target_far`` of these normal images would be
        flagged; ``groups``: each image's cluster (``Calibration.group_rates``). Returns the new ``Calibration``."""
        self._check_fitted()
        far = self.target_far if target_far is None else target_far
        scores = self.score_dataset(normal_images, "calibrating").image_scores
        self.calibration_ = Calibration.from_normal_scores(scores, far, source or "calibrate() on given images",
                                                           groups)
        return self.calibration_

    # ----------------------------------------------------------------- few-shot adaptation
    def adapt_prototypes(self, normal_images: Any) -> BaseDetector:
        """Few-shot adaptation to a product type the model never saw: add what k normal images of it look like to
        the model's normal references (``adapt_features``: PMAD's prototypes, PatchCore's memory bank), without
        training any network. The references of the seen types stay, so they are inspected as before.

        The calibration is dropped (the scores change): recalibrate on normal images of the new type with
        ``calibrate`` (or ``omniad.adaptation.recalibrate``).

        Args:
            normal_images: normal images of the new type, in any form ``fit`` takes.

        Returns:
            self, adapted.
        """
        self._check_fitted()
        if type(self).adapt_features is BaseDetector.adapt_features:
            raise NotImplementedError(f"{self.name} has no normal references to adapt (few-shot adaptation is "
                                      "implemented by methods with prototypes or a memory bank: pmad, patchcore)")
        images = as_image_dataset(normal_images, self.image_size)
        if len(images) == 0:
            raise ValueError("adapt_prototypes needs at least one normal image of the new type; none were given")
        with torch.no_grad():
            self.adapt_features(self.extract(images))
        self.calibration_ = None
        return self

    def adapt_features(self, features: Features) -> None:
        """Hook of ``adapt_prototypes``: extend the normal references with these cached features of new normal
        images; only methods with such references implement it (the network, if any, must not change)."""
        raise NotImplementedError

    @property
    def threshold_(self) -> float:
        """The calibrated decision threshold (NaN when the detector has no calibration)."""
        calibration = getattr(self, "calibration_", None)
        return float("nan") if calibration is None else calibration.threshold

    def decide(self, image_scores: Any) -> Any:
        """Boolean decisions for image scores at the calibrated threshold."""
        if getattr(self, "calibration_", None) is None:
            raise NotFittedError(
                f"{self.name} has no calibrated threshold: fit with calibration_fraction > 0 or call calibrate()"
            )
        return self.calibration_.decide(image_scores)

    def predict(self, images: Tensor) -> Tensor:
        """Boolean decisions at the calibrated threshold for a batch of images."""
        return torch.from_numpy(self.decide(self.score(images).image_scores))

    def _check_fitted(self) -> None:
        if not getattr(self, "fitted_", False):
            raise NotFittedError(f"{type(self).__name__} is not fitted yet: call fit(data) or omniad.load_detector")

    # ----------------------------------------------------------------- export
    def export(self, path: str, format: str = "onnx", **options: Any) -> Any:
        """Write the whole scoring path (uint8 image -> image score, map) to one ONNX or OpenVINO file with the
        calibration in its metadata: see ``omniad.export.export_detector``. Returns the path written."""
        from omniad.export import export_detector

        self._check_fitted()
        return export_detector(self, path, format=format, **options)

    def export_blockers(self) -> list[str]:
        """What keeps this fitted detector's scoring from being one traced graph, one line each (empty: it
        exports). A method whose scoring draws random numbers or branches on values says so here."""
        return []

    def export_batch_size(self) -> int:
        """Images per run of the exported graph (what ``ExportedDetector`` runs at once by default)."""
        return int(self.batch_size)

    # ----------------------------------------------------------------- persistence
    def modules(self) -> dict[str, nn.Module]:
        """The trained modules, saved and restored by name (the base adds the frozen backbone)."""
        raise NotImplementedError

    def meta(self) -> dict[str, Any]:
        """JSON-able facts learned in ``fit`` that ``build`` needs to recreate the modules' shapes."""
        return {}

    def build(self, meta: dict[str, Any]) -> None:
        """Create the trained modules, untrained, from the resolved parameters and ``meta`` (used by ``load``;
        the frozen part is built already)."""
        raise NotImplementedError

    def saved_modules(self) -> dict[str, nn.Module]:
        """``modules()`` plus the frozen backbone when none of them holds it: a bundle is self-contained."""
        modules = dict(self.modules())
        backbone = getattr(self, "backbone_", None)
        held = any(m is backbone for top in modules.values() for m in top.modules())
        if isinstance(backbone, nn.Module) and not held:
            modules["backbone"] = backbone
        return modules

    def save(self, path: str) -> None:
        """Write the fitted model to the folder ``path`` atomically (config.json + weights.safetensors); under
        torch.distributed only rank 0 writes (every rank holds the same model)."""
        from omniad.io import save_detector

        if is_main():
            save_detector(self, path)

    def state_tensors(self) -> dict[str, Tensor]:
        """Every learned tensor, keyed ``<module>.<param>``."""
        self._check_fitted()
        tensors: dict[str, Tensor] = {}
        for prefix, module in self.saved_modules().items():
            for key, value in module.state_dict().items():
                tensors[f"{prefix}.{key}"] = value
        return tensors

    def rebuild(self, meta: dict[str, Any]) -> None:
        """Recreate the fitted structure from a bundle's ``meta`` (untrained weights) and restore its calibration."""
        self._set_up(pretrained=False)
        self.build(meta)
        saved = meta.get("calibration")
        self.calibration_ = None if saved is None else Calibration.from_dict(saved, f"{self.name} calibration")
        self.fitted_ = True

    def load_state(self, meta: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        """Rebuild the modules from ``meta`` and fill them with ``tensors`` (inverse of ``state_tensors``)."""
        self.rebuild(meta)
        expected = set()
        for prefix, module in self.saved_modules().items():
            own = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
            expected.update(f"{prefix}.{k}" for k in own)
            module.load_state_dict(own, strict=True)
            module.to(self.device_).eval()
        extra = sorted(set(tensors) - expected)
        if extra:
            raise KeyError(f"tensors the model does not have: {', '.join(extra[:3])}")
        self._check_scores_one_image()

    def _check_scores_one_image(self) -> None:
        """Score a grey image (as many as one call needs), so that tampered weights (indices out of range, NaN)
        fail at load, not later."""
        probe = torch.full((self.min_score_batch, 3, *self.input_hw), 0.5)
        try:
            result = self.score(probe)
        except (RuntimeError, IndexError, ValueError) as err:
            raise RuntimeError(f"the loaded model cannot score an image: {err}") from None
        if not (torch.isfinite(result.image_scores).all() and torch.isfinite(result.anomaly_maps).all()):
            raise RuntimeError("the loaded model gives NaN or infinite scores: its weights are corrupt")

    def fitted_meta(self) -> dict[str, Any]:
        """Everything besides tensors that a saved bundle carries."""
        meta = dict(self.meta())
        calibration = getattr(self, "calibration_", None)
        meta["calibration"] = None if calibration is None else calibration.to_dict()
        return meta


def whole_square_input(image_size: Any, tile_size: Any) -> bool:
    """Whether a detector takes whole images squashed to a square network input (one side for ``image_size``, no
    tiling), rather than tiles or aspect-kept inputs."""
    return tile_size is None and not isinstance(image_size, (tuple, list))


def _resolve_tiling(values: dict[str, Any], owner: str) -> dict[str, Any]:
    """Tiling's own rules: the stride defaults to half a tile and may not leave gaps; tiles are square."""
    tile = values.get("tile_size")
    if tile is None:
        return values
    if not isinstance(values.get("image_size"), int):
        raise ValueError(f"{owner}: tiling (tile_size={tile}) needs a square image_size (the tiles' side), "
                         f"got {values.get('image_size')!r}")
    if values.get("tile_stride") is None:
        values["tile_stride"] = max(1, int(tile) // 2)
    if values["tile_stride"] > tile:
        raise ValueError(f"{owner}: tile_stride {values['tile_stride']} > tile_size {tile} would leave pixels no "
                         "tile covers")
    return values


class _Resized(torch.utils.data.Dataset):
    """A dataset of (3, h, w) tensors resized to the network's (height, width): squashed, or letterboxed."""

    def __init__(self, images: Any, hw: tuple[int, int], letterboxed: bool = False) -> None:
        self.images, self.hw, self.letterboxed = images, hw, letterboxed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tensor:
        image = self.images[index]
        return letterbox(image[None], *self.hw)[0][0] if self.letterboxed else resize_image(image, self.hw)


def concat_scores(parts: list[AnomalyScores]) -> AnomalyScores:
    """One ``AnomalyScores`` of several; maps of several sizes (images scored at their own size) stay a list of
    (h, w) maps, one per image."""
    scores = torch.cat([p.image_scores.float().cpu() for p in parts])
    if len({tuple(p.anomaly_maps.shape[1:]) for p in parts}) > 1:
        return AnomalyScores(scores, [m.float().cpu() for p in parts for m in p.anomaly_maps])
    return AnomalyScores(scores, torch.cat([p.anomaly_maps.float().cpu() for p in parts]))


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if hasattr(value, "item") and not isinstance(value, Tensor):
        return value.item()
    return value
