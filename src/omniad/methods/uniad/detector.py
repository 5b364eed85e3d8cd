"""UniAD (You et al., NeurIPS 2022): one transformer reconstructs the frozen backbone features of every product
type; a region is as anomalous as its reconstruction error.

Trained unified on cached features: the backbone runs once per training image, the transformer trains on the
cache. ``extract``, ``fit_features`` and ``score_features`` expose that split so that one feature cache can serve
several models (benchmarks, ablations, hyper-parameter searches).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omniad.backbone import Backbone
from omniad.features import extract_features, fuse_stages
from omniad.methods.base import BaseDetector
from omniad.methods.uniad.network import UniADNet
from omniad.postprocess import gaussian_blur, image_score, upsample
from omniad.registry import register_detector
from omniad.runtime import resolve_device, seed_everything
from omniad.types import AnomalyScores

# Values of the preset-controlled parameters. "paper" = the published configuration. "cpu" was chosen by
# measurement on a 2-core CPU (benchmarks/results/uniad*.md), where one optimiser step of the paper's model
# (batch 64, 16 x 16 tokens) takes 52 s (12 min an epoch): an 8 x 8 token grid (stride 32) with a 3 x 3 neighbor
# mask, a 64-wide transformer with 1 + 2 layers (2 decoder layers so that layer-wise queries stay layer-wise),
# batch 16 and lr 5e-3 (more, larger steps for a short schedule), the output bias started at the mean feature,
# and 80 epochs. Measured on the real two-type set (image AUROC, mean of the types, 256 px, lite0, seed 0;
# training time on the shared CPU): 2+2 layers / lr 2e-3 / 6 epochs 0.700 (281 s); 1+1 / 2e-3 / 12 epochs 0.723
# (166 s); 1+1 / 5e-3 / 12 epochs 0.735 (160 s); 1+2 / 5e-3: 10 epochs 0.724, 40 epochs 0.795, 80 epochs 0.816
# (seeds 1 and 2: 0.822, 0.825; PatchCore 0.806); a 16 x 16 grid with a 7 x 7 mask, 40 epochs: 0.771 in 2914 s
# of training (8x the 8 x 8 grid's time at equal epochs); width 128 / FF 512, 80 epochs: 0.772, 1.7x slower.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(
        hidden_dim=256,
        num_encoder_layers=4,
        num_decoder_layers=4,
        num_heads=8,
        dim_feedforward=1024,
        feature_stride=16,
        neighbor_size=7,
        epochs=1000,
        train_batch_size=64,
        lr=1e-4,
        output_bias_init="zero",
    ),
    "cpu": dict(
        hidden_dim=64,
        num_encoder_layers=1,
        num_decoder_layers=2,
        num_heads=4,
        dim_feedforward=256,
        feature_stride=32,
        neighbor_size=3,
        epochs=80,
        train_batch_size=16,
        lr=5e-3,
        output_bias_init="mean",
    ),
}

EpochCallback = Callable[[int, float], None]


@register_detector("uniad")
class UniAD(BaseDetector):
    """UniAD, fitted unified on every product type at once.

    Parameters whose default is None take their value from ``preset`` (the paper's value is named in each line);
    any value given explicitly wins over the preset.

    Args:
        preset: "paper" (the published configuration) or "cpu" (smaller, measured on a 2-core CPU; see
            ``omniad.methods.uniad.detector.PRESETS``) for the parameters left at None.
        stages: backbone feature indices fused into the tokens (paper: stages 1-4 = timm indices 0-3 of an
            EfficientNet, strides 2-16).
        feature_stride: stride of the token grid every stage is resized to (paper: 16; cpu: 32).
        resize_mode: interpolation used to bring each stage to the token grid (paper code: bilinear).
        hidden_dim: transformer width (paper: 256; cpu: 64).
        num_encoder_layers: encoder depth (paper: 4; cpu: 1).
        num_decoder_layers: decoder depth (paper: 4; cpu: 2).
        num_heads: attention heads (paper: 8; cpu: 4).
        dim_feedforward: feed-forward width (paper: 1024; cpu: 256).
        dropout: dropout of the transformer blocks (paper: 0.1).
        neighbor_size: side k of the k x k neighbourhood hidden by neighbor masked attention (paper: 7 on a
            14 x 14 grid; cpu: 3 on 8 x 8).
        neighbor_mask: neighbor masking on/off in (encoder self-attention, decoder attention to the encoder
            output, decoder attention to the previous decoder output) (paper: all on).
        query_embedding: "layerwise" (paper: each decoder layer its own learned query), "first" (a query in the
            first decoder layer only) or "none" (decoder fed the encoder output; the paper's ablation baseline).
        jitter_alpha: feature jittering scale alpha (paper: 20); 0 turns jittering off.
        jitter_prob: probability that a training batch is jittered (paper: 1).
        epochs: training epochs over the cached features (paper: 1000; cpu: 80).
        train_batch_size: feature maps per optimiser step (paper: 64; cpu: 16).
        lr: AdamW learning rate (paper: 1e-4; cpu: 5e-3).
        output_bias_init: initial bias of the output projection: "zero" (paper) or "mean" (cpu: the mean
            training feature, so that a short schedule does not spend its steps learning the offset).
        weight_decay: AdamW weight decay (paper: 1e-4).
        grad_clip: maximum gradient norm (paper: 0.1).
        lr_step_fraction: the learning rate drops x0.1 after this share of the epochs (paper: 0.8).
        sigma: Gaussian smoothing of the up-sampled map (paper: none = 0; protocol: 4).
        image_pooling: "maxpool" (paper: max of the pool_kernel x pool_kernel average-pooled map), "top1"
            (protocol: mean of the top 1%) or "max".
        pool_kernel: average-pooling window for image_pooling="maxpool" (paper: 16).
        **common: see ``BaseDetector``.
    """

    # settings small enough for the contract test on the tiny synthetic set (seconds on a 2-core CPU)
    test_params: dict[str, Any] = dict(hidden_dim=32, num_encoder_layers=1, num_decoder_layers=1, num_heads=4, dim_feedforward=64,
                       feature_stride=16, neighbor_size=3, epochs=30, train_batch_size=8, lr=1e-2,
                       output_bias_init="mean")

    def __init__(
        self,
        *,
        preset: str = "paper",
        stages: tuple[int, ...] = (0, 1, 2, 3),
        feature_stride: int | None = None,
        resize_mode: str = "bilinear",
        hidden_dim: int | None = None,
        num_encoder_layers: int | None = None,
        num_decoder_layers: int | None = None,
        num_heads: int | None = None,
        dim_feedforward: int | None = None,
        dropout: float = 0.1,
        neighbor_size: int | None = None,
        neighbor_mask: tuple[bool, bool, bool] = (True, True, True),
        query_embedding: str = "layerwise",
        jitter_alpha: float = 20.0,
        jitter_prob: float = 1.0,
        epochs: int | None = None,
        train_batch_size: int | None = None,
        lr: float | None = None,
        output_bias_init: str | None = None,
        weight_decay: float = 1e-4,
        grad_clip: float = 0.1,
        lr_step_fraction: float = 0.8,
        sigma: float = 0.0,
        image_pooling: str = "maxpool",
        pool_kernel: int = 16,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        if preset not in PRESETS:
            raise ValueError(f"unknown UniAD preset {preset!r}; known: {', '.join(PRESETS)}")
        self.preset = preset
        self.stages = tuple(stages)
        self.feature_stride = feature_stride
        self.resize_mode = resize_mode
        self.hidden_dim = hidden_dim
        self.num_encoder_layers = num_encoder_layers
        self.num_decoder_layers = num_decoder_layers
        self.num_heads = num_heads
        self.dim_feedforward = dim_feedforward
        self.dropout = dropout
        self.neighbor_size = neighbor_size
        self.neighbor_mask = tuple(bool(m) for m in neighbor_mask)
        self.query_embedding = query_embedding
        self.jitter_alpha = jitter_alpha
        self.jitter_prob = jitter_prob
        self.epochs = epochs
        self.train_batch_size = train_batch_size
        self.lr = lr
        if output_bias_init not in (None, "zero", "mean"):
            raise ValueError(f"output_bias_init must be 'zero' or 'mean', got {output_bias_init!r}")
        self.output_bias_init = output_bias_init
        self.weight_decay = weight_decay
        self.grad_clip = grad_clip
        self.lr_step_fraction = lr_step_fraction
        self.sigma = sigma
        self.image_pooling = image_pooling
        self.pool_kernel = pool_kernel

    # ----------------------------------------------------------------- configuration
    def resolved(self, name: str) -> Any:
        """A preset-controlled parameter's effective value: the one given, else the preset's."""
        value = getattr(self, name)
        return PRESETS[self.preset][name] if value is None else value

    def resolved_params(self) -> dict[str, Any]:
        """Every preset-controlled parameter with its effective value (for reports)."""
        return {name: self.resolved(name) for name in PRESETS[self.preset]}

    def _make_backbone(self) -> Backbone:
        return Backbone(self.backbone, self.stages, "random" if self._loading else self.weights)

    def _make_net(self, in_channels: int, grid: Sequence[int]) -> UniADNet:
        r = self.resolved
        return UniADNet(
            in_channels,
            grid,
            hidden_dim=r("hidden_dim"),
            num_encoder_layers=r("num_encoder_layers"),
            num_decoder_layers=r("num_decoder_layers"),
            num_heads=r("num_heads"),
            dim_feedforward=r("dim_feedforward"),
            dropout=self.dropout,
            neighbor_size=r("neighbor_size"),
            neighbor_mask=self.neighbor_mask,
            query_embedding=self.query_embedding,
            jitter_alpha=self.jitter_alpha,
            jitter_prob=self.jitter_prob,
        )

    def fuse(self, stage_maps: list[Tensor]) -> Tensor:
        """Backbone stage maps -> (B, C, H / feature_stride, W / feature_stride) tokens of all stages."""
        stride = self.resolved("feature_stride")
        h = stage_maps[0].shape[-2] * self.backbone_.strides[0]
        w = stage_maps[0].shape[-1] * self.backbone_.strides[0]
        if h % stride or w % stride:
            raise ValueError(f"image size {h}x{w} is not a multiple of feature_stride={stride}")
        return fuse_stages(stage_maps, (h // stride, w // stride), self.resize_mode)

    # ----------------------------------------------------------------- fitting
    def _ensure_backbone(self) -> None:
        if getattr(self, "device_", None) is None:
            self.device_ = resolve_device(self.device)
        if getattr(self, "backbone_", None) is None:
            seed_everything(self.seed)  # a randomly initialised backbone must be the same one every time
            self.backbone_ = self._make_backbone().to(self.device_)

    def extract(self, data: Any) -> Tensor:
        """Fused backbone features (N, C, h, w) of a set of images, on the CPU: the cache UniAD trains on.

        Args:
            data: any image source ``fit`` accepts.
        """
        self._ensure_backbone()
        (features,) = extract_features(
            self.backbone_, data, self.device_, self.batch_size, transform=self.fuse, progress=self.progress
        )
        return features

    def _fit(self, images) -> None:
        self.backbone_ = None
        self._train(self.extract(images))

    def fit_features(
        self,
        features: Tensor,
        calibration_features: Tensor | None = None,
        epoch_callback: EpochCallback | None = None,
    ) -> UniAD:
        """Fit on features already extracted with ``extract`` (by a detector with the same backbone, stages,
        feature stride and image size): what ``fit`` does after running the backbone, so one feature cache can
        train several models. Gives the same model as ``fit`` on the images those features came from.

        Args:
            features: (N, C, h, w) training features (normal images of every type, no labels).
            calibration_features: optional features of held-out normal images to calibrate ``threshold_`` on.
            epoch_callback: called after every epoch with (epoch, mean training loss); the model is in eval mode
                during the call, so it may call ``score_features`` (e.g. to follow detection over training).

        Returns:
            self, fitted.
        """
        self.device_ = resolve_device(self.device)
        self._ensure_backbone()
        self._train(features, epoch_callback)
        self.fitted_ = True
        self.threshold_ = float("nan")
        if calibration_features is not None:
            self.calibrate_features(calibration_features)
        return self

    def calibrate_features(self, normal_features: Tensor) -> float:
        """``calibrate`` on features from ``extract`` of held-out normal images: sets and returns ``threshold_``."""
        from omniad.calibration import threshold_at_far

        scores = self.score_features(normal_features).image_scores
        self.calibration_scores_ = scores
        self.threshold_ = threshold_at_far(scores.numpy(), self.target_far)
        return self.threshold_

    def _train(self, features: Tensor, epoch_callback: EpochCallback | None = None) -> None:
        if features.dim() != 4 or features.shape[0] == 0:
            raise ValueError(f"UniAD trains on (N, C, h, w) features, got {tuple(features.shape)}")
        seed_everything(self.seed)  # same model whether the features came from fit() or fit_features()
        generator = torch.Generator().manual_seed(self.seed)
        epochs, batch = self.resolved("epochs"), self.resolved("train_batch_size")
        self.net_ = net = self._make_net(features.shape[1], features.shape[-2:]).to(self.device_)
        if self.resolved("output_bias_init") == "mean":
            # start from the mean feature instead of 0: a short schedule need not spend its steps on the offset
            with torch.no_grad():
                net.output_proj.bias.copy_(features.float().mean(dim=(0, 2, 3)).to(self.device_))
        optimizer = torch.optim.AdamW(
            net.parameters(), lr=self.resolved("lr"), betas=(0.9, 0.999), weight_decay=self.weight_decay
        )
        step = max(1, int(round(self.lr_step_fraction * epochs)))
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step, gamma=0.1)
        self.history_: list[float] = []
        bar = range(epochs)
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(bar, desc="UniAD epochs", unit="epoch")
        for epoch in bar:
            net.train()
            total, count = 0.0, 0
            for index in torch.randperm(features.shape[0], generator=generator).split(batch):
                target = features[index].to(self.device_, torch.float32)
                loss = F.mse_loss(net(target), target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.grad_clip:
                    nn.utils.clip_grad_norm_(net.parameters(), self.grad_clip)
                optimizer.step()
                total += loss.item() * len(index)
                count += len(index)
            scheduler.step()
            mean_loss = total / count
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"UniAD training diverged at epoch {epoch} (loss {mean_loss})")
            self.history_.append(mean_loss)
            if self.progress:
                bar.set_postfix(loss=f"{mean_loss:.4g}")
            net.eval()
            if epoch_callback is not None:
                self.fitted_ = True  # the callback may score with the model as it stands
                try:
                    with torch.no_grad():
                        epoch_callback(epoch, mean_loss)
                finally:
                    self.fitted_ = False
        net.eval()

    # ----------------------------------------------------------------- scoring
    def _maps_to_scores(self, token_maps: Tensor, size: Sequence[int]) -> AnomalyScores:
        maps = gaussian_blur(upsample(token_maps, tuple(size)), self.sigma)
        return AnomalyScores(image_score(maps, self.image_pooling, kernel=self.pool_kernel), maps)

    def _score(self, images: Tensor) -> AnomalyScores:
        features = self.fuse(self.backbone_(images))
        return self._maps_to_scores(self.net_.anomaly_map(features), images.shape[-2:])

    @torch.no_grad()
    def score_features(self, features: Tensor, image_size: int | Sequence[int] | None = None) -> AnomalyScores:
        """Score features from ``extract`` (the same numbers ``score`` gives on their images).

        Args:
            features: (N, C, h, w) fused features.
            image_size: side (or (H, W)) of the images they came from; default ``image_size``.

        Returns:
            ``AnomalyScores`` on the CPU, maps at the image size.
        """
        self._check_fitted()
        size = image_size if image_size is not None else self.image_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        self.net_.eval()
        scores, maps = [], []
        for start in range(0, features.shape[0], self.batch_size):
            chunk = features[start : start + self.batch_size].to(self.device_, torch.float32)
            result = self._maps_to_scores(self.net_.anomaly_map(chunk), size)
            scores.append(result.image_scores.float().cpu())
            maps.append(result.anomaly_maps.float().cpu())
        return AnomalyScores(torch.cat(scores), torch.cat(maps))

    # ----------------------------------------------------------------- persistence
    def _modules(self) -> dict[str, nn.Module]:
        return {"backbone": self.backbone_, "net": self.net_}

    def _meta(self) -> dict[str, Any]:
        return {"in_channels": int(self.net_.in_channels), "grid": list(self.net_.grid)}

    def _build(self, meta: dict[str, Any]) -> None:
        self.backbone_ = self._make_backbone()
        self.net_ = self._make_net(meta["in_channels"], meta["grid"])
