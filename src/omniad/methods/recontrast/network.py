"""ReContrast (Guo et al., NeurIPS 2023): contrastive reconstruction across a frozen and a trainable encoder.

One bottleneck and decoder (Reverse Distillation's, imported from ``omniad.methods.revdist.network``) read the
stage maps of both encoders, batched together; two sets of 1x1 output heads turn the decoder's maps into
reconstructions: the decoder run on the *trainable* encoder's maps must rebuild the *frozen* encoder's maps,
and the one run on the frozen encoder's maps must rebuild the trainable encoder's (as in the official code).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omniad.methods.revdist.network import OneClassBottleneck, ReverseDecoder


class RecontrastNet(nn.Module):
    """ReContrast's trainable part: trainable encoder copy, shared bottleneck + decoder, two head sets.

    Tensors in, tensors out: ``forward(images, frozen_maps) -> (targets, reconstructions)``, each a list of 2n
    maps: targets = the frozen encoder's n maps then the trainable encoder's n maps; reconstructions = head A
    on the decoder run from the trainable maps (rebuilding the frozen ones), then head B on the decoder run
    from the frozen maps (rebuilding the trainable ones). The frozen encoder lives outside so that its maps
    can be cached.

    Args:
        encoder: the trainable encoder (a copy of the frozen ``Backbone``; its BatchNorm stays in eval mode).
        channels: encoder stage channels, finest first.
        strides: encoder stage strides, finest first.
        embed_channels: OCBE output channels (None: 2 x the last stage's).
        bottleneck_blocks: residual blocks of the OCBE embedding stage.
        decoder_blocks: residual blocks per decoder stage, finest first.
        width_ratio: inner width / output channels of every residual block.
        decoder_activation: activation of the decoder ("gelu", as CADA and the official code).
    """

    def __init__(
        self,
        encoder: nn.Module,
        channels: Sequence[int],
        strides: Sequence[int],
        embed_channels: int | None = None,
        bottleneck_blocks: int = 3,
        decoder_blocks: Sequence[int] = (6, 4, 3),
        width_ratio: float = 0.5,
        decoder_activation: str = "gelu",
    ) -> None:
        super().__init__()
        self.encoder = encoder
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
        # head A rebuilds the frozen encoder (input: trainable maps), B the trainable one (input: frozen maps)
        self.heads = nn.ModuleList([nn.ModuleList([nn.Conv2d(c, c, 1) for c in channels]) for _ in range(2)])

    def train(self, mode: bool = True) -> RecontrastNet:
        """Train the bottleneck, decoder and heads; the encoder's BatchNorm stays in eval mode."""
        super().train(mode)
        self.encoder.train(False)
        return self

    def forward(self, images: Tensor, frozen_maps: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """(B, 3, H, W) images + the frozen encoder's maps of them -> (targets, reconstructions), 2n each."""
        trainable_maps = list(self.encoder(images))
        frozen_maps = list(frozen_maps)
        batch = images.shape[0]
        both = [torch.cat([t, f], dim=0) for t, f in zip(trainable_maps, frozen_maps, strict=True)]
        decoded = self.decoder(self.bottleneck(both))
        from_trainable = [head(d[:batch]) for head, d in zip(self.heads[0], decoded, strict=True)]
        from_frozen = [head(d[batch:]) for head, d in zip(self.heads[1], decoded, strict=True)]
        return frozen_maps + trainable_maps, from_trainable + from_frozen


# ------------------------------------------------------------------ loss with hard mining
def scale_gradient(x: Tensor, weight: Tensor) -> Tensor:
    """Identity in value; the gradient flowing back to ``x`` is multiplied by ``weight`` (broadcast)."""
    return x * weight + x.detach() * (1 - weight)


def hard_mining_alpha(iteration: int, total: int, start: float = -3.0, end: float = 1.0, warmup: float = 0.1) -> float:
    """ReContrast's hard-mining strength: alpha goes linearly from ``start`` to ``end`` over the first
    ``warmup`` share of the iterations, then stays at ``end``. The easy points are those whose distance is
    below mean + alpha x std, so a larger alpha down-weights more of them."""
    ramp = max(warmup * total, 1e-12)
    return min(start + (end - start) * iteration / ramp, end)


def easy_point_weights(target: Tensor, reconstruction: Tensor, alpha: float, factor: float = 0.0) -> Tensor:
    """(B, 1, h, w) gradient weights: ``factor`` where the per-location cosine distance is below
    mean + alpha x std over the batch (well reconstructed: easy), 1 elsewhere."""
    with torch.no_grad():
        distance = 1 - F.cosine_similarity(target, reconstruction, dim=1)
        threshold = distance.mean() + alpha * distance.flatten().std()
        weights = torch.where(distance < threshold, torch.full_like(distance, factor), torch.ones_like(distance))
    return weights.unsqueeze(1)


def global_cosine_hm(
    targets: Sequence[Tensor], reconstructions: Sequence[Tensor], alpha: float, factor: float = 0.0
) -> Tensor:
    """Sum over stages of the global cosine distance (each map flattened per image, averaged over the batch),
    with the gradient of the easy points scaled by ``factor`` (targets get no gradient)."""
    loss = torch.zeros((), device=reconstructions[0].device)
    for target, recon in zip(targets, reconstructions, strict=True):
        target = target.detach()
        recon = scale_gradient(recon, easy_point_weights(target, recon, alpha, factor))
        loss = loss + (1 - F.cosine_similarity(target.flatten(1), recon.flatten(1), dim=1)).mean()
    return loss


def recontrast_loss(
    targets: Sequence[Tensor], reconstructions: Sequence[Tensor], alpha: float, factor: float = 0.0
) -> Tensor:
    """Mean over the two branches (frozen rebuilt, trainable rebuilt) of ``global_cosine_hm``."""
    n = len(targets) // 2
    return (
        global_cosine_hm(targets[:n], reconstructions[:n], alpha, factor)
        + global_cosine_hm(targets[n:], reconstructions[n:], alpha, factor)
    ) / 2


__all__ = [
    "RecontrastNet",
    "scale_gradient",
    "hard_mining_alpha",
    "easy_point_weights",
    "global_cosine_hm",
    "recontrast_loss",
]
