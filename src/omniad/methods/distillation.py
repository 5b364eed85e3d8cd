"""What Reverse Distillation and ReContrast share as detectors: the hyper-parameters of the one-class bottleneck
and reverse decoder, their presets' depths, and the raw map's size. Neither method's detector imports the other's:
both derive from ``DistillationDetector`` here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from omniad.methods.base import BaseDetector
from omniad.params import POSITIVE_INT, Each, Interval, Options


def preset_depths(blocks: tuple[int, ...], stages: int) -> tuple[int, ...]:
    """A preset's decoder depths (finest first, given for 3 stages) fitted to ``stages`` stages: the coarse
    end is kept and extra finer stages repeat the finest depth: (6, 4, 3) -> (4, 3) for 2, (6, 6, 4, 3) for 4."""
    if stages <= len(blocks):
        return blocks[len(blocks) - stages :]
    return (blocks[0],) * (stages - len(blocks)) + blocks


class DistillationDetector(BaseDetector):
    """Shared parameters of the reverse-distillation family (not registered).

    Args:
        preset: "paper" or "cpu" (see the method's ``presets``).
        stages: timm feature indices of the encoder stages (lite0: 1, 2, 3 = strides 4, 8, 16; the paper's
            WideResNet-50 layers 1-3 are the same indices).
        iterations: optimiser steps (paper 5,000).
        train_batch_size: images per training step (paper 16).
        lr: AdamW learning rate.
        betas: AdamW betas.
        weight_decay: AdamW weight decay.
        embed_channels: OCBE output channels (None: 2 x the last stage's channels, as WideResNet's layer4).
        bottleneck_blocks: residual blocks of the OCBE embedding stage (paper 3).
        decoder_blocks: residual blocks per decoder stage, finest first (paper (6, 4, 3)); a preset's depths
            follow the number of stages.
        width_ratio: inner width / output channels of every residual block (0.5, as WideResNet).
        decoder_activation: "gelu" (CADA: for training stability) or "relu" (original RD).
        **common: see ``BaseDetector`` (defaults: sigma 4, image_pooling "top1", the protocol's and CADA's).
    """

    defaults = {"sigma": 4.0, "image_pooling": "top1"}
    constraints = {
        "stages": Each(Interval(0, None, integer=True)),
        "iterations": POSITIVE_INT,
        "train_batch_size": POSITIVE_INT,
        "lr": Interval(0.0, None, low_open=True),
        "betas": Each(Interval(0.0, 1.0, high_open=True), length=2),
        "weight_decay": Interval(0.0, None),
        "embed_channels": Interval(1, None, integer=True, allow_none=True),
        "bottleneck_blocks": POSITIVE_INT,
        "decoder_blocks": Each(POSITIVE_INT),
        "width_ratio": Interval(0.0, None, low_open=True),
        "decoder_activation": Options(("gelu", "relu")),
    }

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
        **common: Any,
    ) -> None:
        super().__init__(**common)
        self.preset = preset
        self.stages = stages
        self.iterations = iterations
        self.train_batch_size = train_batch_size
        self.lr = lr
        self.betas = betas
        self.weight_decay = weight_decay
        self.embed_channels = embed_channels
        self.bottleneck_blocks = bottleneck_blocks
        self.decoder_blocks = decoder_blocks
        self.width_ratio = width_ratio
        self.decoder_activation = decoder_activation

    def derive_params(self, values: dict[str, Any]) -> dict[str, Any]:
        if self.decoder_blocks is None:  # a preset's depths, given for 3 stages, follow the number of stages
            values["decoder_blocks"] = preset_depths(values["decoder_blocks"], len(values["stages"]))
        return values

    def decoder_settings(self) -> dict[str, Any]:
        """The bottleneck's and decoder's resolved settings, as both networks take them."""
        r = self.resolved_
        return dict(embed_channels=r.embed_channels, bottleneck_blocks=r.bottleneck_blocks,
                    decoder_blocks=r.decoder_blocks, width_ratio=r.width_ratio, decoder_activation=r.decoder_activation)

    def map_size(self, stage_maps: Sequence) -> tuple[int, int]:
        """The input size the encoder's maps came from (the raw map is made at that size, as RD does)."""
        stride = self.backbone_.strides[0]
        return stage_maps[0].shape[-2] * stride, stage_maps[0].shape[-1] * stride


__all__ = ["DistillationDetector", "preset_depths"]
