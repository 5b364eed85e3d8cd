"""Reverse Distillation detector ("revdist"): fit loop on cached frozen-encoder features, scoring, presets."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from omniad.backbone import Backbone
from omniad.features import extract_features
from omniad.methods.base import BaseDetector, resolve_preset
from omniad.methods.revdist.network import RevDistNet, anomaly_map, revdist_loss
from omniad.postprocess import image_score
from omniad.registry import register_detector
from omniad.types import AnomalyScores

# The settings a preset fills in for every hyper-parameter left at None.
#   paper: CADA's RD setting (5,000 iterations, batch 16) with RD's WideResNet-50 depths (OCBE 3 blocks,
#          decoder 6/4/3 blocks per stage, finest first).
#   cpu:   measured on a 2-core shared CPU with tf_efficientnet_lite0 at 256 px: one residual block per stage
#          and batch 8 bring one iteration from ~6-14 s (paper depths, batch 16) to ~1-2 s; 300 iterations
#          (~2.7 passes over a 900-image set) instead of 5,000. Its cost: benchmarks/results/rdrc.md.
REVDIST_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "iterations": 5000,
        "train_batch_size": 16,
        "bottleneck_blocks": 3,
        "decoder_blocks": (6, 4, 3),
    },
    "cpu": {"iterations": 300, "train_batch_size": 8, "bottleneck_blocks": 1, "decoder_blocks": (1, 1, 1)},
}


def preset_depths(blocks: tuple[int, ...], stages: int) -> tuple[int, ...]:
    """A preset's decoder depths (finest first, given for 3 stages) fitted to ``stages`` stages: the coarse
    end is kept and extra finer stages repeat the finest depth: (6, 4, 3) -> (4, 3) for 2, (6, 6, 4, 3) for 4."""
    if stages <= len(blocks):
        return blocks[len(blocks) - stages :]
    return (blocks[0],) * (stages - len(blocks)) + blocks


def batch_indices(n: int, batch_size: int, iterations: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Indices of ``iterations`` training batches: shuffled passes over ``n`` items, the incomplete tail of
    each pass dropped (as a DataLoader with drop_last); a set smaller than one batch gives whole-set
    batches."""
    batch_size = min(batch_size, n)
    done = 0
    while done < iterations:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]
            done += 1
            if done == iterations:
                return


def progress_bar(total: int, enabled: bool, desc: str):
    """A tqdm bar (or a no-op stand-in) for training loops."""
    if enabled:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="it", leave=False)

    class _Null:
        def update(self, n: int = 1) -> None: ...

        def set_postfix(self, **kwargs: Any) -> None: ...

        def close(self) -> None: ...

    return _Null()


def train_iterations(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Tensor],
    loss_of_batch: Callable[[int, Tensor], Tensor],
    total: int,
    progress: bool,
    desc: str,
    scheduler: Any = None,
) -> list[float]:
    """The optimisation loop RD and ReContrast share: one step per batch of indices (``loss_of_batch(it,
    index)`` computes the loss), ``net`` in training mode throughout and back in eval mode afterwards, even
    when interrupted. Returns the loss of every iteration."""
    history: list[float] = []
    bar = progress_bar(total, progress, desc)
    net.train()
    try:
        for it, index in enumerate(batches):
            loss = loss_of_batch(it, index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            history.append(float(loss.detach()))
            bar.update()
            bar.set_postfix(loss=f"{history[-1]:.4f}")
    finally:
        bar.close()
        net.eval()
    return history


@register_detector("revdist")
class RevDist(BaseDetector):
    """Reverse Distillation from a one-class embedding (Deng & Li, CVPR 2022), in CADA's unified setting.

    A frozen encoder gives stage maps; a trainable one-class bottleneck (OCBE) squeezes them into one
    embedding and a reverse decoder rebuilds every stage from it. Trained on normal images only, the decoder
    fails to rebuild anomalous regions: the anomaly map is the sum over stages of the per-location cosine
    distance between encoder and decoder maps, up-sampled to the input and Gaussian-blurred (sigma 4). The
    encoder is frozen, so its features are computed once and the bottleneck and decoder train on the cache.

    Hyper-parameters left at None come from ``preset`` ("paper": CADA's setting; "cpu": the measured CPU
    setting, see ``REVDIST_PRESETS``).

    Args:
        preset: "paper" or "cpu".
        stages: timm feature indices of the encoder stages (lite0: 1, 2, 3 = strides 4, 8, 16; the paper's
            WideResNet-50 layers 1-3 are the same indices).
        iterations: optimiser steps (paper 5,000).
        train_batch_size: images per training step (paper 16).
        lr: AdamW learning rate.
        betas: AdamW betas.
        weight_decay: AdamW weight decay.
        embed_channels: OCBE output channels (None: 2 x the last stage's channels, as WideResNet's layer4).
        bottleneck_blocks: residual blocks of the OCBE embedding stage (paper 3).
        decoder_blocks: residual blocks per decoder stage, finest first (paper (6, 4, 3)).
        width_ratio: inner width / output channels of every residual block (0.5, as WideResNet).
        decoder_activation: "gelu" (CADA: for training stability) or "relu" (original RD).
        sigma: Gaussian blur of the anomaly map (0 disables).
        pooling: image score from the map: "top1" (mean of the top 1%, protocol and CADA) or "max"
            (original RD).
        **common: ``BaseDetector`` arguments (backbone, weights, image_size, device, seed, batch_size, ...).

    Attributes:
        backbone_: the frozen ``Backbone`` (encoder).
        net_: the trained ``RevDistNet``.
        loss_history_: training loss of every iteration (not saved).
    """

    # settings small enough for the contract test on the tiny synthetic set (seconds on a 2-core CPU)
    test_params: dict[str, Any] = {"preset": "cpu", "iterations": 60}

    presets = REVDIST_PRESETS

    def __init__(
        self,
        *,
        preset: str = "paper",
        stages: Sequence[int] = (1, 2, 3),
        iterations: int | None = None,
        train_batch_size: int | None = None,
        lr: float = 2e-3,
        betas: Sequence[float] = (0.9, 0.999),
        weight_decay: float = 1e-5,
        embed_channels: int | None = None,
        bottleneck_blocks: int | None = None,
        decoder_blocks: Sequence[int] | None = None,
        width_ratio: float = 0.5,
        decoder_activation: str = "gelu",
        sigma: float = 4.0,
        pooling: str = "top1",
        **common: Any,
    ) -> None:
        super().__init__(**common)
        resolved = resolve_preset(
            self.presets,
            preset,
            {
                "iterations": iterations,
                "train_batch_size": train_batch_size,
                "bottleneck_blocks": bottleneck_blocks,
                "decoder_blocks": decoder_blocks,
            },
        )
        self.preset = preset
        self.stages = tuple(int(s) for s in stages)
        self.iterations = int(resolved["iterations"])
        self.train_batch_size = int(resolved["train_batch_size"])
        self.lr = lr
        self.betas = tuple(float(b) for b in betas)
        self.weight_decay = weight_decay
        self.embed_channels = embed_channels
        self.bottleneck_blocks = int(resolved["bottleneck_blocks"])
        blocks = tuple(int(b) for b in resolved["decoder_blocks"])
        if decoder_blocks is None:  # a preset's depths, given for 3 stages, follow the number of stages
            blocks = preset_depths(blocks, len(self.stages))
        self.decoder_blocks = blocks
        self.width_ratio = width_ratio
        self.decoder_activation = decoder_activation
        self.sigma = sigma
        self.pooling = pooling
        if self.iterations < 1 or self.train_batch_size < 1:
            raise ValueError("iterations and train_batch_size must be positive")
        if pooling not in ("top1", "max"):
            raise ValueError(f"pooling must be 'top1' or 'max', got {pooling!r}")

    # ----------------------------------------------------------------- modules
    def _make_backbone(self) -> Backbone:
        weights = "random" if self._loading else self.weights
        return Backbone(self.backbone, self.stages, weights=weights)

    def _make_net(self, channels: Sequence[int], strides: Sequence[int]) -> RevDistNet:
        return RevDistNet(
            channels,
            strides,
            embed_channels=self.embed_channels,
            bottleneck_blocks=self.bottleneck_blocks,
            decoder_blocks=self.decoder_blocks,
            width_ratio=self.width_ratio,
            decoder_activation=self.decoder_activation,
        )

    def _build(self, meta: dict[str, Any]) -> None:
        self.backbone_ = self._make_backbone().to(self.device_)
        self.net_ = self._make_net(self.backbone_.channels, self.backbone_.strides).to(self.device_)

    def _modules(self) -> dict[str, nn.Module]:
        return {"backbone": self.backbone_, "net": self.net_}

    def _meta(self) -> dict[str, Any]:
        return {"channels": list(self.backbone_.channels), "strides": list(self.backbone_.strides)}

    # ----------------------------------------------------------------- fitting
    def _fit(self, images: torch.utils.data.Dataset) -> None:
        self._build({})
        features = extract_features(self.backbone_, images, self.device_, self.batch_size, progress=self.progress)
        optimizer = torch.optim.AdamW(
            self.net_.parameters(), lr=self.lr, betas=self.betas, weight_decay=self.weight_decay
        )
        generator = torch.Generator().manual_seed(self.seed)

        def loss_of_batch(it: int, index: Tensor) -> Tensor:
            targets = [f[index].to(self.device_, torch.float32) for f in features]
            return revdist_loss(targets, self.net_(targets))

        batches = batch_indices(len(images), self.train_batch_size, self.iterations, generator)
        self.loss_history_: list[float] = train_iterations(
            self.net_, optimizer, batches, loss_of_batch, self.iterations, self.progress, "revdist training"
        )

    # ----------------------------------------------------------------- scoring
    def _score(self, images: Tensor) -> AnomalyScores:
        self.net_.eval()
        features = self.backbone_(images)
        maps = anomaly_map(features, self.net_(features), tuple(images.shape[-2:]), self.sigma)
        return AnomalyScores(image_score(maps, self.pooling), maps)
