"""PMADNet: MAE-style patch-level reconstruction with a ViT encoder and a ViT decoder of the same size (the
symmetric structure PMAD found better than MAE's light decoder), predicting each masked patch's visual token.

Pure maths: (patch embeddings, mask) in, token logits out, identical in train and eval mode (no dropout).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sincos_pos_embed(dim: int, grid: tuple[int, int]) -> Tensor:
    """Fixed 2-D sine-cosine positional embeddings (MAE's), (h * w, dim); half the channels encode the row,
    half the column. Fixed rather than learned so that any grid size works without resizing."""
    if dim % 4:
        raise ValueError(f"the embedding dimension must be divisible by 4 for 2-D sin-cos positions, got {dim}")
    h, w = grid
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    rows, cols = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )

    def encode(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1)


class Block(nn.Module):
    """Pre-norm transformer block whose attention can be restricted to a subset of keys."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding dimension {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """x: (B, N, C); key_mask: (B, N) bool, True = may be attended to (None: all)."""
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x + self.proj(out.transpose(1, 2).reshape(b, n, c))
        return x + self.mlp(self.norm2(x))


class PMADNet(nn.Module):
    """ViT encoder over the visible patches + ViT decoder over all positions -> visual-token logits.

    The encoder sees only visible patches (masked positions are zeroed and excluded from attention, which equals
    MAE's encoding of the visible subset while allowing a different number of hidden patches per image). The
    decoder puts a learned mask token at the hidden positions, adds positions again, and attends over everything.

    Args:
        in_dim: dimension of one patch's input (3 * p * p raw pixels, or the backbone feature dimension).
        num_tokens: visual-token vocabulary size K.
        grid: (h, w) patch grid.
        embed_dim: encoder width (ViT-B: 768).
        depth: encoder blocks (ViT-B: 12).
        num_heads: attention heads (ViT-B: 12).
        decoder_embed_dim: decoder width (None: ``embed_dim``, symmetric).
        decoder_depth: decoder blocks (None: ``depth``, symmetric; MAE's asymmetric decoder is 8 x 512).
        decoder_num_heads: decoder heads (None: ``num_heads``).
        mlp_ratio: hidden width of each block's MLP relative to its width.
    """

    def __init__(
        self,
        in_dim: int,
        num_tokens: int,
        grid: tuple[int, int],
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        decoder_embed_dim: int | None = None,
        decoder_depth: int | None = None,
        decoder_num_heads: int | None = None,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        dec_dim = decoder_embed_dim or embed_dim
        dec_depth = depth if decoder_depth is None else decoder_depth
        dec_heads = decoder_num_heads or num_heads
        self.grid = (int(grid[0]), int(grid[1]))
        self.in_dim = in_dim
        self.num_tokens = num_tokens
        self.patch_embed = nn.Linear(in_dim, embed_dim)
        self.register_buffer("pos_embed", sincos_pos_embed(embed_dim, self.grid), persistent=False)
        self.encoder = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.encoder_norm = nn.LayerNorm(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(dec_dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(dec_dim, self.grid), persistent=False)
        self.decoder = nn.ModuleList(Block(dec_dim, dec_heads, mlp_ratio) for _ in range(dec_depth))
        self.decoder_norm = nn.LayerNorm(dec_dim)
        self.head = nn.Linear(dec_dim, num_tokens)
        self.apply(_init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def forward(self, patches: Tensor, mask: Tensor) -> Tensor:
        """Predict every position's token distribution from the visible patches.

        Args:
            patches: (B, N, in_dim) patch inputs, N = h * w in row-major order.
            mask: (B, N) bool, True = hidden. Each image needs at least one visible patch.

        Returns:
            (B, N, K) logits; those at hidden positions are the predictions PMAD scores.
        """
        b, n, d = patches.shape
        if n != self.num_patches or d != self.in_dim:
            expected = f"(B, {self.num_patches}, {self.in_dim})"
            raise ValueError(f"expected patches of shape {expected}, got {tuple(patches.shape)}")
        if mask.shape != (b, n):
            raise ValueError(f"mask must be ({b}, {n}), got {tuple(mask.shape)}")
        visible = ~mask.bool()
        if not bool(visible.any(dim=1).all()):
            raise ValueError("every image needs at least one visible patch")
        # hidden patches never reach the network: zeroed here and excluded from every attention below
        x = self.patch_embed(patches * visible[..., None].to(patches.dtype)) + self.pos_embed
        for block in self.encoder:
            x = block(x, key_mask=visible)
        x = self.decoder_embed(self.encoder_norm(x))
        x = torch.where(visible[..., None], x, self.mask_token.to(x.dtype)) + self.decoder_pos_embed
        for block in self.decoder:
            x = block(x)
        return self.head(self.decoder_norm(x))


def token_entropy(logits: Tensor) -> Tensor:
    """PMAD's patch score s = -sum_i p_i log p_i of the predicted token distribution; (..., K) -> (...)."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def token_cross_entropy(logits: Tensor, tokens: Tensor) -> Tensor:
    """-log p(observed token); (..., K) logits and (...) token ids -> (...)."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    return -log_p.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def max_entropy(num_tokens: int) -> float:
    """Entropy of the uniform distribution over ``num_tokens`` tokens (log K), an upper bound of the score."""
    return math.log(num_tokens)


__all__ = ["PMADNet", "sincos_pos_embed", "token_cross_entropy", "token_entropy", "max_entropy"]
