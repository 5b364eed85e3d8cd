"""Reverse Distillation (Deng & Li, CVPR 2022): a trainable one-class bottleneck (OCBE) and a decoder that is
the frozen encoder reversed, built generically from any backbone's stage channels and strides.

The building blocks (``OneClassBottleneck``, ``ReverseDecoder``, the cosine-distance helpers) are exported for
ReContrast, whose bottleneck and decoder are Reverse Distillation's.

Shapes, for encoder stages with channels ``c_1..c_n`` and strides ``s_1 < .. < s_n``:
    OCBE:    n maps -> each brought to stride s_n (strided 3x3 convs) -> concatenated (n * c_n channels) ->
             residual blocks with a stride-2 start, like the next encoder stage ->
             (embed_channels, stride 2 s_n)
    decoder: embedding -> for k = n..1: an up-sampling residual stage to (c_k, stride s_k)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omniad.postprocess import upsample

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; use one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def _power_of_two(ratio: float, what: str) -> int:
    steps = math.log2(ratio) if ratio >= 1 else -1.0
    if steps < 0 or steps != int(steps):
        raise ValueError(f"{what} must be a power of two (got a stride ratio of {ratio}); choose other stages")
    return int(steps)


class ResidualBlock(nn.Module):
    """ResNet bottleneck block (1x1 -> 3x3 -> 1x1, residual) that can down- or up-sample.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        width: channels of the inner 3x3 convolution (WideResNet-50: out_channels / 2).
        scale: 1 keeps the resolution; "down" halves it with a stride-2 3x3 conv (encoder side); an int r > 1
            multiplies it by r with an r x r transposed conv in place of the 3x3 (the decoder, "reversed"
            encoder).
        activation: "relu" or "gelu".
    """

    def __init__(
        self, in_channels: int, out_channels: int, width: int, scale: int | str = 1, activation: str = "relu"
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        if scale == "down":
            self.conv2: nn.Module = nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False)
            shortcut: nn.Module | None = nn.Conv2d(in_channels, out_channels, 1, stride=2, bias=False)
        elif isinstance(scale, int) and scale > 1:
            self.conv2 = nn.ConvTranspose2d(width, width, scale, stride=scale, bias=False)
            shortcut = nn.ConvTranspose2d(in_channels, out_channels, scale, stride=scale, bias=False)
        else:
            self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
            shortcut = nn.Conv2d(in_channels, out_channels, 1, bias=False) if in_channels != out_channels else None
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential(shortcut, nn.BatchNorm2d(out_channels)) if shortcut is not None else None
        self.act = _activation(activation)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.act(out + identity)


def _stage(
    in_channels: int, out_channels: int, blocks: int, width_ratio: float, scale: int | str, activation: str
) -> nn.Sequential:
    width = max(1, int(round(out_channels * width_ratio)))
    layers = [ResidualBlock(in_channels, out_channels, width, scale, activation)]
    layers += [ResidualBlock(out_channels, out_channels, width, 1, activation) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def _conv_bn_act(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class OneClassBottleneck(nn.Module):
    """OCBE: multi-scale feature fusion of the encoder stages, then a one-class embedding stage.

    Each stage but the last is brought to the last stage's stride by stride-2 3x3 convs (channels doubling,
    the last conv giving the last stage's channels, as in RD's WideResNet-50 bottleneck: 256 -> 512 -> 1024);
    the maps are concatenated and passed through residual blocks that start with a stride-2 block, like the
    next encoder stage (WideResNet-50's layer4: 3 blocks, 2048 channels).

    Args:
        channels: encoder stage channels, finest first.
        strides: encoder stage strides, finest first.
        embed_channels: output channels (default 2 x the last stage's, as layer4 is to layer3).
        blocks: residual blocks of the embedding stage.
        width_ratio: inner width of each residual block / its output channels (0.5 = WideResNet).
    """

    def __init__(
        self,
        channels: Sequence[int],
        strides: Sequence[int],
        embed_channels: int | None = None,
        blocks: int = 3,
        width_ratio: float = 0.5,
    ) -> None:
        super().__init__()
        if len(channels) != len(strides) or not channels:
            raise ValueError(f"channels {list(channels)} and strides {list(strides)} must be non-empty, same length")
        last_c, last_s = int(channels[-1]), int(strides[-1])
        self.fuse = nn.ModuleList()
        for c, s in zip(channels[:-1], strides[:-1], strict=True):
            steps = _power_of_two(last_s / s, "the ratio of the last stage's stride to every other stage's")
            layers, current = [], int(c)
            for j in range(max(steps, 1)):
                out = last_c if j == max(steps, 1) - 1 else int(c) * 2 ** (j + 1)
                layers.append(_conv_bn_act(current, out, 2 if steps else 1))
                current = out
            self.fuse.append(nn.Sequential(*layers))
        self.embed_channels = int(embed_channels) if embed_channels else 2 * last_c
        self.embed = _stage(len(channels) * last_c, self.embed_channels, blocks, width_ratio, "down", "relu")
        self.stride = 2 * last_s

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """n encoder maps -> (B, embed_channels, H / (2 s_n), W / (2 s_n))."""
        fused = [f(x) for f, x in zip(self.fuse, features[:-1], strict=True)] + [features[-1]]
        return self.embed(torch.cat(fused, dim=1))


class ReverseDecoder(nn.Module):
    """The encoder reversed: up-sampling residual stages producing maps with the encoder stages' channels and
    strides.

    Args:
        channels: encoder stage channels, finest first.
        strides: encoder stage strides, finest first.
        in_channels: channels of the bottleneck embedding.
        in_stride: stride of the bottleneck embedding.
        blocks: residual blocks per decoder stage, one count per encoder stage, finest first. RD's
            WideResNet-50 decoder has 3 blocks in the stage that rebuilds layer3, 4 for layer2 and 6 for
            layer1: (6, 4, 3).
        width_ratio: inner width of each residual block / its output channels.
        activation: "gelu" (CADA's choice for training stability) or "relu" (original RD).
    """

    def __init__(
        self,
        channels: Sequence[int],
        strides: Sequence[int],
        in_channels: int,
        in_stride: int,
        blocks: Sequence[int] = (6, 4, 3),
        width_ratio: float = 0.5,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        if len(blocks) != len(channels):
            raise ValueError(f"decoder blocks {list(blocks)} need one count per encoder stage ({len(channels)} stages)")
        self.stages = nn.ModuleList()
        current_c, current_s = int(in_channels), int(in_stride)
        for c, s, n in reversed(list(zip(channels, strides, blocks, strict=True))):
            ratio = current_s // int(s)
            _power_of_two(current_s / int(s), "the decoder's up-sampling ratio between consecutive stages")
            self.stages.append(_stage(current_c, int(c), int(n), width_ratio, ratio if ratio > 1 else 1, activation))
            current_c, current_s = int(c), int(s)

    def forward(self, embedding: Tensor) -> list[Tensor]:
        """Embedding -> one reconstructed map per encoder stage, finest first."""
        outputs, x = [], embedding
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs[::-1]


class RevDistNet(nn.Module):
    """Reverse Distillation's trainable part: OCBE bottleneck + reverse decoder.

    Tensors in, tensors out: frozen-encoder stage maps (finest first) -> reconstructed maps of the same
    shapes. The frozen encoder lives outside (its features are cached during training).

    Args:
        channels: encoder stage channels, finest first.
        strides: encoder stage strides, finest first.
        embed_channels: OCBE output channels (default 2 x the last stage's).
        bottleneck_blocks: residual blocks of the OCBE embedding stage.
        decoder_blocks: residual blocks per decoder stage, finest first.
        width_ratio: inner width / output channels of every residual block.
        decoder_activation: activation of the decoder ("gelu" in CADA).
    """

    def __init__(
        self,
        channels: Sequence[int],
        strides: Sequence[int],
        embed_channels: int | None = None,
        bottleneck_blocks: int = 3,
        decoder_blocks: Sequence[int] = (6, 4, 3),
        width_ratio: float = 0.5,
        decoder_activation: str = "gelu",
    ) -> None:
        super().__init__()
        self.bottleneck = OneClassBottleneck(channels, strides, embed_channels, bottleneck_blocks, width_ratio)
        self.decoder = ReverseDecoder(
            channels,
            strides,
            self.bottleneck.embed_channels,
            self.bottleneck.stride,
            decoder_blocks,
            width_ratio,
            decoder_activation,
        )

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        """Encoder maps -> decoder maps with the same shapes."""
        return self.decoder(self.bottleneck(features))


# ------------------------------------------------------------------ distances, loss and map
def cosine_distance_maps(encoder: Sequence[Tensor], decoder: Sequence[Tensor]) -> list[Tensor]:
    """Per-location 1 - cosine similarity over channels: one (B, h_i, w_i) map per stage."""
    return [1 - F.cosine_similarity(e, d, dim=1) for e, d in zip(encoder, decoder, strict=True)]


def revdist_loss(encoder: Sequence[Tensor], decoder: Sequence[Tensor]) -> Tensor:
    """Mean over stages of the mean per-location cosine distance (encoder maps are targets: no gradient)."""
    distances = cosine_distance_maps([e.detach() for e in encoder], decoder)
    return torch.stack([d.mean() for d in distances]).mean()


def anomaly_map(encoder: Sequence[Tensor], decoder: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
    """Sum over stages of the cosine-distance maps up-sampled to ``size``: (B, H, W) (RD's raw map; the
    detector's post-processing smooths it)."""
    distances = cosine_distance_maps(encoder, decoder)
    return torch.stack([upsample(d, size) for d in distances]).sum(dim=0)


__all__ = [
    "ResidualBlock",
    "OneClassBottleneck",
    "ReverseDecoder",
    "RevDistNet",
    "cosine_distance_maps",
    "revdist_loss",
    "anomaly_map",
]
