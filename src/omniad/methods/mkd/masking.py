"""Which patches the student does not see.

The paper hides the patches the ViT teacher's [CLS] attention ranks highest, so that the student must infer the
informative regions from their context. With a ViT teacher (``--backbone vit_... --weights FILE``) that is what
"guided" uses: the [CLS] query's attention to every patch token in the block that gives the distilled map,
averaged over its heads (``ClsAttention``). A CNN teacher has no [CLS] token; its counterpart is the spatial
attention map of attention transfer (Zagoruyko & Komodakis, ICLR 2017): the mean over channels of the squared
activations of the teacher's last feature map at each position, which is high where the network responds
strongly (the object) and low on flat background. "guided" hides the top ``ratio`` share of patches by it;
"random" hides a uniformly random share (the paper's ablation).

A mask is a (B, N) bool tensor over the patch grid, True = hidden; every mask hides exactly
``num_masked(N, ratio)`` patches per image.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

MASKINGS = ("guided", "random")


def num_masked(num_patches: int, ratio: float) -> int:
    """Patches hidden at ``ratio``: round(ratio * N), at most N - 1 (the student needs some context)."""
    if not 0 <= ratio < 1:
        raise ValueError(f"a mask ratio must lie in [0, 1), got {ratio}")
    return int(min(num_patches - 1, round(ratio * num_patches))) if num_patches > 1 else 0


def spatial_attention(features: Tensor) -> Tensor:
    """(B, C, h, w) teacher features -> (B, h * w) attention-transfer map: mean over channels of the squares."""
    return features.pow(2).mean(1).flatten(1)


class ClsAttention:
    """While active (``with``), records the [CLS] token's attention to the patch tokens in one timm ViT block each
    time the ViT runs: ``maps`` gets one (B, h * w) tensor per forward, the softmax attention of the [CLS] query
    over every token, averaged over the heads, at the patch tokens (register tokens and [CLS] left out)."""

    def __init__(self, vit: nn.Module, block: int) -> None:
        self.attention = vit.blocks[block].attn
        self.prefix = int(getattr(vit, "num_prefix_tokens", 1))
        self.maps: list[Tensor] = []

    def __enter__(self) -> ClsAttention:
        self.handle = self.attention.register_forward_hook(self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()

    def _record(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        x = inputs[0]  # (B, N, C): the block's normalised tokens, [CLS] first
        b, n, _ = x.shape
        q, k, _ = module.qkv(x).reshape(b, n, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4)
        q, k = module.q_norm(q), module.k_norm(k)
        weights = ((q[:, :, :1] * module.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, 1, N)
        self.maps.append(weights[:, :, 0, self.prefix :].mean(dim=1).detach())


def guided_mask(attention: Tensor, ratio: float) -> Tensor:
    """Hide the ``ratio`` share of patches with the highest ``attention`` ((B, N); ties broken by index)."""
    b, n = attention.shape
    count = num_masked(n, ratio)
    order = torch.sort(attention, dim=1, descending=True, stable=True).indices[:, :count]
    return torch.zeros(b, n, dtype=torch.bool, device=attention.device).scatter(1, order, True)


def random_mask(batch: int, num_patches: int, ratio: float, generator: torch.Generator) -> Tensor:
    """Hide a uniformly random ``ratio`` share of patches in each image (drawn from ``generator``, on the CPU)."""
    count = num_masked(num_patches, ratio)
    order = torch.rand(batch, num_patches, generator=generator).argsort(dim=1)[:, :count]
    return torch.zeros(batch, num_patches, dtype=torch.bool).scatter(1, order, True)


__all__ = ["MASKINGS", "ClsAttention", "guided_mask", "num_masked", "random_mask", "spatial_attention"]
