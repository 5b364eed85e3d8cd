"""The masked-distillation student: a randomly initialised ViT (timm's ``VisionTransformer``) whose token grid is
the teacher's feature grid, and the discrepancy that is both its loss and the novelty score.

Pure maths: (normalised images, mask) in, (B, C, h, w) features out; identical in train and eval mode (no
dropout), so that scores do not depend on the mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn


class MaskedStudent(nn.Module):
    """A ViT that sees only the unmasked patches: the embedding of every masked patch is replaced by one learned
    mask token before positions are added and before the encoder, so no pixel of a masked patch reaches it.

    Args:
        image_size: (height, width) of the input images, or the side of square ones.
        patch_size: side of a patch in pixels: the teacher's stride, so the student's grid is the teacher's.
        out_channels: channels of the teacher's features (a linear head maps the ViT width to them).
        embed_dim: ViT width.
        depth: transformer blocks.
        num_heads: attention heads.
        mlp_ratio: MLP width of each block relative to ``embed_dim``.
    """

    def __init__(
        self,
        image_size: int | tuple[int, int],
        patch_size: int,
        out_channels: int,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if any(side % patch_size for side in ((image_size,) * 2 if isinstance(image_size, int) else image_size)):
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch_size}")
        self.vit = VisionTransformer(
            img_size=image_size, patch_size=patch_size, num_classes=0, global_pool="", embed_dim=embed_dim,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.head = nn.Linear(embed_dim, out_channels)
        self.grid: tuple[int, int] = tuple(int(g) for g in self.vit.patch_embed.grid_size)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def forward(self, images: Tensor, mask: Tensor | None = None) -> Tensor:
        """(B, 3, H, W) normalised images and a (B, h * w) bool mask (True = hidden; None = nothing hidden) ->
        (B, out_channels, h, w) predicted teacher features at every position, hidden ones included."""
        x = self.vit.patch_embed(images)  # (B, N, D); each token depends on its own patch's pixels only
        if mask is not None:
            x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x)
        x = self.vit.norm_pre(self.vit.patch_drop(self.vit._pos_embed(x)))
        x = self.vit.norm(self.vit.blocks(x))[:, self.vit.num_prefix_tokens :]
        b = x.shape[0]
        return self.head(x).transpose(1, 2).reshape(b, -1, self.grid[0], self.grid[1])


def discrepancy(teacher: Tensor, student: Tensor) -> Tensor:
    """Squared error between the L2-normalised (over channels) teacher and student features at every position:
    (B, C, h, w) twice -> (B, h, w), in [0, 4]. Its mean is the training loss; on the full input, the map."""
    return (F.normalize(teacher, dim=1) - F.normalize(student, dim=1)).pow(2).sum(1)


__all__ = ["MaskedStudent", "discrepancy"]
