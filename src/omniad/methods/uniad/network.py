"""UniADNet: UniAD's feature-reconstruction transformer (You et al., NeurIPS 2022), as a pure module.

Tensors in, tensors out: fused backbone features (B, C, h, w) -> their reconstruction (B, C, h, w). The three
mechanisms that keep the model from learning an "identical shortcut" (copying its input, anomalies included):

- layer-wise query embedding: every decoder layer starts from its own learned query instead of the features;
- neighbor masked attention: a token may not attend to its k x k neighbourhood (itself included), so it has to
  be predicted from farther context;
- feature jittering: in training mode only, the input tokens are perturbed and the clean ones are the target,
  which makes the model a denoiser of normal features.

The layer wiring follows the authors' released code: each decoder layer attends from its query to the encoder
output, then to the previous decoder layer's output (the encoder output for the first layer), then a
feed-forward block; post-norm everywhere, ReLU, xavier-initialised linear layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

QUERY_MODES = ("layerwise", "first", "none")


def neighbor_blocked(grid: tuple[int, int], size: int) -> Tensor:
    """Which key token each query token may NOT attend to under neighbor masking.

    Args:
        grid: (h, w) token grid, tokens in row-major order.
        size: side k of the square neighbourhood (odd; clipped at the grid's borders).

    Returns:
        (h*w, h*w) boolean tensor, True where query token i is blocked from key token j, i.e. where j lies in
        the k x k window centred on i.
    """
    h, w = grid
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    half = size // 2
    near_rows = (rows[:, None] - rows[None, :]).abs() <= half
    near_cols = (cols[:, None] - cols[None, :]).abs() <= half
    return near_rows & near_cols


def neighbor_attention_mask(grid: tuple[int, int], size: int) -> Tensor:
    """The additive attention mask of neighbor masked attention: -inf where blocked, 0 elsewhere.

    Raises:
        ValueError: when some token's neighbourhood covers the whole grid (it would have nothing to attend to).
    """
    if size < 1 or size % 2 == 0:
        raise ValueError(f"neighbor_size must be a positive odd number, got {size}")
    blocked = neighbor_blocked(grid, size)
    if blocked.all(dim=1).any():
        raise ValueError(
            f"a {size}x{size} neighbor mask blocks every token of the {grid[0]}x{grid[1]} token grid for some "
            "token; use a smaller neighbor_size or a larger token grid (bigger images or a smaller feature_stride)"
        )
    mask = torch.zeros(blocked.shape)
    return mask.masked_fill(blocked, float("-inf"))


def feature_jitter(tokens: Tensor, alpha: float, generator: torch.Generator | None = None) -> Tensor:
    """UniAD's feature jittering: add D ~ N(0, (alpha * ||f|| / C)^2) to every token f of C channels.

    Args:
        tokens: (..., C) feature tokens.
        alpha: noise scale (paper: 20).
        generator: optional random generator (default: torch's global one).

    Returns:
        The jittered tokens, same shape.
    """
    std = alpha * tokens.norm(dim=-1, keepdim=True) / tokens.shape[-1]
    noise = torch.randn(tokens.shape, generator=generator, device=tokens.device, dtype=tokens.dtype)
    return tokens + noise * std


class LearnedPositionEmbedding(nn.Module):
    """DETR-style learned absolute position: a row and a column embedding of half the width each."""

    def __init__(self, grid: tuple[int, int], dim: int) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"hidden_dim must be even for the row/column position embedding, got {dim}")
        self.grid = tuple(grid)
        self.row = nn.Parameter(torch.rand(grid[0], dim // 2))
        self.col = nn.Parameter(torch.rand(grid[1], dim // 2))

    def forward(self) -> Tensor:
        """(h*w, dim) embedding in row-major token order."""
        h, w = self.grid
        col = self.col.unsqueeze(0).expand(h, w, -1)
        row = self.row.unsqueeze(1).expand(h, w, -1)
        return torch.cat([col, row], dim=-1).flatten(0, 1)


class _FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))


class EncoderLayer(nn.Module):
    """Post-norm self-attention (position added to queries and keys) + feed-forward."""

    def __init__(self, dim: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ff = _FeedForward(dim, ff, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x: Tensor, pos: Tensor, mask: Tensor | None) -> Tensor:
        qk = x + pos
        x = self.norm1(x + self.drop1(self.attn(qk, qk, x, attn_mask=mask, need_weights=False)[0]))
        return self.norm2(x + self.drop2(self.ff(x)))


class DecoderLayer(nn.Module):
    """Post-norm: query -> encoder output, query -> previous decoder output, feed-forward (the released wiring).

    ``tgt`` is the layer's learned query under layer-wise query embedding; without it, the previous decoder
    output itself (so the first attention becomes cross-attention and the second self-attention, a vanilla
    transformer decoder).
    """

    def __init__(self, dim: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.attn_memory = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.attn_previous = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ff = _FeedForward(dim, ff, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop1, self.drop2, self.drop3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(
        self,
        tgt: Tensor,
        previous: Tensor,
        memory: Tensor,
        pos: Tensor,
        mask_memory: Tensor | None,
        mask_previous: Tensor | None,
    ) -> Tensor:
        x = tgt
        a = self.attn_memory(x + pos, memory + pos, memory, attn_mask=mask_memory, need_weights=False)[0]
        x = self.norm1(x + self.drop1(a))
        a = self.attn_previous(x + pos, previous + pos, previous, attn_mask=mask_previous, need_weights=False)[0]
        x = self.norm2(x + self.drop2(a))
        return self.norm3(x + self.drop3(self.ff(x)))


class UniADNet(nn.Module):
    """Fused features (B, C, h, w) -> reconstruction (B, C, h, w).

    Args:
        in_channels: channels C of the fused backbone features.
        grid: (h, w) token grid (image size / feature stride); fixed, since the position embedding, the
            queries and the neighbor mask are per token.
        hidden_dim: transformer width (paper: 256).
        num_encoder_layers: encoder depth (paper: 4).
        num_decoder_layers: decoder depth (paper: 4).
        num_heads: attention heads (paper: 8).
        dim_feedforward: feed-forward width (paper: 1024).
        dropout: dropout in attention and feed-forward blocks (paper: 0.1).
        neighbor_size: side k of the masked k x k neighbourhood (paper: 7 on a 14 x 14 grid).
        neighbor_mask: apply the mask in (encoder self-attention, decoder attention to the encoder output,
            decoder attention to the previous decoder output); all False = no neighbor masking.
        query_embedding: "layerwise" (paper: each decoder layer its own learned query), "first" (one learned
            query for the first decoder layer only) or "none" (the decoder starts from the encoder output).
        jitter_alpha: feature-jitter scale alpha (paper: 20); 0 disables jittering.
        jitter_prob: probability that a training batch is jittered (paper: 1).
    """

    def __init__(
        self,
        in_channels: int,
        grid: Sequence[int],
        hidden_dim: int = 256,
        num_encoder_layers: int = 4,
        num_decoder_layers: int = 4,
        num_heads: int = 8,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        neighbor_size: int = 7,
        neighbor_mask: Sequence[bool] = (True, True, True),
        query_embedding: str = "layerwise",
        jitter_alpha: float = 20.0,
        jitter_prob: float = 1.0,
    ) -> None:
        super().__init__()
        if query_embedding not in QUERY_MODES:
            raise ValueError(f"query_embedding must be one of {QUERY_MODES}, got {query_embedding!r}")
        if len(neighbor_mask) != 3:
            raise ValueError(f"neighbor_mask needs 3 flags (encoder, decoder-memory, decoder-previous), got "
                             f"{tuple(neighbor_mask)}")
        self.grid = (int(grid[0]), int(grid[1]))
        self.in_channels = in_channels
        self.query_embedding = query_embedding
        self.neighbor_flags = tuple(bool(m) for m in neighbor_mask)
        self.jitter_alpha = jitter_alpha
        self.jitter_prob = jitter_prob
        tokens = self.grid[0] * self.grid[1]

        self.input_proj = nn.Linear(in_channels, hidden_dim)
        self.output_proj = nn.Linear(hidden_dim, in_channels)
        self.pos_embed = LearnedPositionEmbedding(self.grid, hidden_dim)
        self.encoder = nn.ModuleList(
            EncoderLayer(hidden_dim, num_heads, dim_feedforward, dropout) for _ in range(num_encoder_layers)
        )
        self.decoder = nn.ModuleList(
            DecoderLayer(hidden_dim, num_heads, dim_feedforward, dropout) for _ in range(num_decoder_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        n_queries = {"layerwise": num_decoder_layers, "first": 1, "none": 0}[query_embedding]
        # N(0, 1) like the nn.Embedding the released code uses for its queries
        self.queries = nn.ParameterList(nn.Parameter(torch.randn(tokens, hidden_dim)) for _ in range(n_queries))
        mask = neighbor_attention_mask(self.grid, neighbor_size) if any(self.neighbor_flags) else None
        # built once per grid; not saved: it is a function of the hyper-parameters
        self.register_buffer("attn_mask", mask, persistent=False)
        self._init_linear()

    def _init_linear(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def _mask(self, which: int) -> Tensor | None:
        return self.attn_mask if self.neighbor_flags[which] else None

    def forward(self, features: Tensor) -> Tensor:
        """Reconstruct (B, C, h, w) features; in training mode the input is jittered first (target: clean)."""
        b, c, h, w = features.shape
        if (h, w) != self.grid or c != self.in_channels:
            raise ValueError(
                f"UniADNet was built for ({self.in_channels}, {self.grid[0]}, {self.grid[1]}) features, got "
                f"({c}, {h}, {w}); images must have the size the detector was fitted on"
            )
        tokens = features.flatten(2).transpose(1, 2)  # (B, h*w, C)
        if self.training and self.jitter_alpha > 0 and torch.rand(()) < self.jitter_prob:
            tokens = feature_jitter(tokens, self.jitter_alpha)
        x = self.input_proj(tokens)
        pos = self.pos_embed().unsqueeze(0)
        for layer in self.encoder:
            x = layer(x, pos, self._mask(0))
        memory = previous = x
        for i, layer in enumerate(self.decoder):
            if self.query_embedding == "layerwise" or (self.query_embedding == "first" and i == 0):
                tgt = self.queries[i].unsqueeze(0).expand(b, -1, -1)
            else:
                tgt = previous
            previous = layer(tgt, previous, memory, pos, self._mask(1), self._mask(2))
        out = self.output_proj(self.decoder_norm(previous))
        return out.transpose(1, 2).reshape(b, c, h, w)

    def anomaly_map(self, features: Tensor) -> Tensor:
        """(B, h, w) per-token L2 norm of features minus reconstruction."""
        return (features - self(features)).norm(dim=1)
