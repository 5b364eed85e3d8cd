"""UniAD (You et al., NeurIPS 2022): one transformer reconstructs the frozen backbone features of every product
type; a region is as anomalous as its reconstruction error.

Trained unified on cached features: the backbone runs once per training image, the transformer trains on the
cache. ``extract``, ``fit_features`` and ``score_features`` expose that split so that one feature cache can serve
several models (benchmarks, ablations, hyper-parameter searches).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omniad.features import fuse_stages
from omniad.methods.base import BaseDetector
from omniad.methods.uniad.network import UniADNet
from omniad.params import POSITIVE_INT, Each, Interval, Options
from omniad.registry import register_detector
from omniad.training import epoch_batches, epoch_means, train

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
        **common: see ``BaseDetector`` (UniAD's defaults: sigma 0, no smoothing, and image_pooling "maxpool",
            the max of the 16 x 16 average-pooled map: the paper's).
    """

    presets = PRESETS
    defaults = {"sigma": 0.0, "image_pooling": "maxpool"}
    constraints = {
        "stages": Each(Interval(0, None, integer=True)),
        "feature_stride": POSITIVE_INT,
        "resize_mode": Options(("bilinear", "bicubic", "nearest", "area")),
        "hidden_dim": POSITIVE_INT,
        "num_encoder_layers": POSITIVE_INT,
        "num_decoder_layers": POSITIVE_INT,
        "num_heads": POSITIVE_INT,
        "dim_feedforward": POSITIVE_INT,
        "dropout": Interval(0.0, 1.0, high_open=True),
        "neighbor_size": POSITIVE_INT,
        "neighbor_mask": Each(Options((True, False)), length=3),
        "query_embedding": Options(("layerwise", "first", "none")),
        "jitter_alpha": Interval(0.0, None),
        "jitter_prob": Interval(0.0, 1.0),
        "epochs": POSITIVE_INT,
        "train_batch_size": POSITIVE_INT,
        "lr": Interval(0.0, None, low_open=True),
        "output_bias_init": Options(("zero", "mean")),
        "weight_decay": Interval(0.0, None),
        "grad_clip": Interval(0.0, None),
        "lr_step_fraction": Interval(0.0, 1.0, low_open=True),
    }

    # settings small enough for the contract test on the tiny synthetic set (seconds on a 2-core CPU)
    test_params: dict[str, Any] = dict(
        hidden_dim=32, num_encoder_layers=1, num_decoder_layers=1, num_heads=4, dim_feedforward=64,
        feature_stride=16, neighbor_size=3, epochs=30, train_batch_size=8, lr=1e-2, output_bias_init="mean",
    )

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
        **common: Any,
    ) -> None:
        super().__init__(**common)
        self.preset = preset
        self.stages = stages
        self.feature_stride = feature_stride
        self.resize_mode = resize_mode
        self.hidden_dim = hidden_dim
        self.num_encoder_layers = num_encoder_layers
        self.num_decoder_layers = num_decoder_layers
        self.num_heads = num_heads
        self.dim_feedforward = dim_feedforward
        self.dropout = dropout
        self.neighbor_size = neighbor_size
        self.neighbor_mask = neighbor_mask
        self.query_embedding = query_embedding
        self.jitter_alpha = jitter_alpha
        self.jitter_prob = jitter_prob
        self.epochs = epochs
        self.train_batch_size = train_batch_size
        self.lr = lr
        self.output_bias_init = output_bias_init
        self.weight_decay = weight_decay
        self.grad_clip = grad_clip
        self.lr_step_fraction = lr_step_fraction

    def _make_net(self, in_channels: int, grid: Sequence[int]) -> UniADNet:
        r = self.resolved_
        return UniADNet(
            in_channels,
            grid,
            hidden_dim=r.hidden_dim,
            num_encoder_layers=r.num_encoder_layers,
            num_decoder_layers=r.num_decoder_layers,
            num_heads=r.num_heads,
            dim_feedforward=r.dim_feedforward,
            dropout=r.dropout,
            neighbor_size=r.neighbor_size,
            neighbor_mask=tuple(bool(m) for m in r.neighbor_mask),
            query_embedding=r.query_embedding,
            jitter_alpha=r.jitter_alpha,
            jitter_prob=r.jitter_prob,
        )

    def features(self, images: Tensor) -> Tensor:
        """(B, C, H / feature_stride, W / feature_stride) tokens: every stage resized to the token grid."""
        stage_maps = self.backbone_(images)
        stride = self.resolved_.feature_stride
        h = stage_maps[0].shape[-2] * self.backbone_.strides[0]
        w = stage_maps[0].shape[-1] * self.backbone_.strides[0]
        if h % stride or w % stride:
            raise ValueError(f"image size {h}x{w} is not a multiple of feature_stride={stride}")
        return fuse_stages(stage_maps, (h // stride, w // stride), self.resolved_.resize_mode)

    def train_features(self, features: Tensor, epoch_callback: EpochCallback | None = None) -> None:
        """Train the transformer to reconstruct the cached tokens.

        Args:
            features: (N, C, h, w) tokens from ``extract``.
            epoch_callback: called after every epoch with (epoch, mean training loss); the model is in eval mode
                during the call, so it may call ``score_cached`` (e.g. to follow detection over training).
        """
        if features.dim() != 4 or features.shape[0] == 0:
            raise ValueError(f"UniAD trains on (N, C, h, w) features, got {tuple(features.shape)}")
        r = self.resolved_
        generator = torch.Generator().manual_seed(self.seed)
        n, batch = features.shape[0], r.train_batch_size
        self.net_ = net = self._make_net(features.shape[1], features.shape[-2:]).to(self.device_)
        if r.output_bias_init == "mean":
            # start from the mean feature instead of 0: a short schedule need not spend its steps on the offset
            with torch.no_grad():
                net.output_proj.bias.copy_(features.float().mean(dim=(0, 2, 3)).to(self.device_))
        optimizer = torch.optim.AdamW(net.parameters(), lr=r.lr, betas=(0.9, 0.999), weight_decay=r.weight_decay)
        steps_per_epoch = -(-n // batch)
        drop_every = max(1, int(round(r.lr_step_fraction * r.epochs))) * steps_per_epoch  # x0.1 per drop
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.1 ** (step // drop_every))

        def loss_of_batch(step: int, index: Tensor, model: nn.Module) -> Tensor:
            target = features[index].to(self.device_, torch.float32)
            return F.mse_loss(model(target), target)

        def on_epoch(epoch: int, mean_loss: float) -> None:
            if epoch_callback is not None:
                self.fitted_ = True  # the callback may score with the model as it stands
                try:
                    epoch_callback(epoch, mean_loss)
                finally:
                    self.fitted_ = False

        history = train(
            net, optimizer, epoch_batches(n, batch, r.epochs, generator), loss_of_batch,
            total=r.epochs * steps_per_epoch, desc="UniAD training", progress=self.progress,
            grad_clip=r.grad_clip, scheduler=scheduler, steps_per_epoch=steps_per_epoch, on_epoch=on_epoch,
        )
        self.loss_history_: list[float] = epoch_means(history, n, batch)

    def score_features(self, features: Tensor) -> Tensor:
        return self.net_.anomaly_map(features)

    def modules(self) -> dict[str, nn.Module]:
        return {"net": self.net_}

    def meta(self) -> dict[str, Any]:
        return {"in_channels": int(self.net_.in_channels), "grid": list(self.net_.grid)}

    def build(self, meta: dict[str, Any]) -> None:
        self.net_ = self._make_net(meta["in_channels"], meta["grid"])
