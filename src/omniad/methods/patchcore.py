"""PatchCore (Roth et al., CVPR 2022): a memory bank of locally aggregated mid-level patch features, reduced by a
greedy k-center coreset; a patch is as anomalous as its distance to the nearest bank entry.

Trained unified: one bank for the patches of every product type, no labels.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omniad.backbone import Backbone
from omniad.cluster import nearest_centres
from omniad.features import extract_features, fuse_stages
from omniad.methods.base import BaseDetector
from omniad.postprocess import gaussian_blur, image_score, upsample
from omniad.registry import register_detector
from omniad.types import AnomalyScores


def aggregate_patches(features: list[Tensor], patch_size: int = 3) -> Tensor:
    """PatchCore's locally aware patch features: ``patch_size`` x ``patch_size`` average of each stage, the coarser
    stages up-sampled to the first stage's grid, concatenated. (B, C, h, w)."""
    pooled = [F.avg_pool2d(f, patch_size, stride=1, padding=patch_size // 2, count_include_pad=False) for f in features]
    return fuse_stages(pooled)


def greedy_coreset(features: Tensor, n_select: int, projection_dim: int = 128, seed: int = 0) -> Tensor:
    """Indices of a greedy k-center coreset (Sener & Savarese), searched on a random projection of the features
    as PatchCore does, which keeps each iteration to one pass over ``N x projection_dim`` numbers."""
    n, dim = features.shape
    n_select = max(1, min(n_select, n))
    generator = torch.Generator().manual_seed(seed)
    if projection_dim and projection_dim < dim:
        matrix = torch.randn(dim, projection_dim, generator=generator) / math.sqrt(projection_dim)
        projected = features.float() @ matrix.to(features.device)
    else:
        projected = features.float()
    sq_norms = (projected * projected).sum(1)
    selected = torch.empty(n_select, dtype=torch.long)
    current = int(torch.randint(n, (1,), generator=generator))
    min_d2 = torch.full((n,), float("inf"), device=projected.device)
    d2 = torch.empty_like(min_d2)
    for i in range(n_select):
        selected[i] = current
        # |x - c|^2 - |c|^2 = |x|^2 - 2 x.c in one fused pass over the data (memory-bound on a CPU)
        torch.addmv(sq_norms, projected, projected[current], alpha=-2, out=d2)
        d2 += sq_norms[current]
        torch.minimum(min_d2, d2, out=min_d2)
        current = int(min_d2.argmax())
    return selected


class PatchCoreNet(nn.Module):
    """Backbone features -> patch distances to the memory bank. Pure: no training logic."""

    def __init__(self, backbone: Backbone, bank_size: int, feature_dim: int, patch_size: int = 3) -> None:
        super().__init__()
        self.backbone = backbone
        self.patch_size = patch_size
        self.register_buffer("memory_bank", torch.zeros(bank_size, feature_dim))

    def embed(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, C, h, w) aggregated patch features."""
        return aggregate_patches(self.backbone(images), self.patch_size)

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, h, w) nearest-bank distances."""
        emb = self.embed(images)
        b, c, h, w = emb.shape
        queries = emb.permute(0, 2, 3, 1).reshape(-1, c)
        return nearest_centres(queries, self.memory_bank, chunk=4096)[0].view(b, h, w)


@register_detector("patchcore")
class PatchCore(BaseDetector):
    """PatchCore, fitted unified on every product type at once.

    Args:
        stages: backbone feature indices (PatchCore: the two mid-level stages; 2, 3 = strides 8, 16 for
            EfficientNets, layer2/layer3 of a ResNet are 1, 2 ... check ``Backbone.strides``).
        patch_size: neighbourhood of the local average aggregation.
        coreset_ratio: share of all training patches kept in the memory bank (paper: 0.01-0.25; 0.1 here).
        max_bank_size: optional cap on the bank size (a CPU-friendly setting; None = no cap).
        coreset_candidates: optional cap on the patches the greedy search runs over, drawn at random first
            (a CPU-friendly setting: each greedy step is one pass over the candidates; None = all patches).
        projection_dim: dimension of the random projection the greedy coreset search runs on.
        sigma: Gaussian smoothing of the up-sampled map (protocol: 4).
        image_pooling: "max" (paper), "top1" (protocol) or "maxpool".
        **common: see ``BaseDetector``.
    """

    # settings small enough for the contract test on the tiny synthetic set (seconds on a 2-core CPU)
    test_params: dict[str, Any] = {}

    def __init__(
        self,
        *,
        stages: tuple[int, ...] = (2, 3),
        patch_size: int = 3,
        coreset_ratio: float = 0.1,
        max_bank_size: int | None = None,
        coreset_candidates: int | None = None,
        projection_dim: int = 128,
        sigma: float = 4.0,
        image_pooling: str = "max",
        **common: Any,
    ) -> None:
        super().__init__(**common)
        self.stages = tuple(stages)
        self.patch_size = patch_size
        self.coreset_ratio = coreset_ratio
        self.max_bank_size = max_bank_size
        self.coreset_candidates = coreset_candidates
        self.projection_dim = projection_dim
        self.sigma = sigma
        self.image_pooling = image_pooling

    def _make_backbone(self) -> Backbone:
        return Backbone(self.backbone, self.stages, "random" if self._loading else self.weights)

    def _fit(self, images) -> None:
        self.backbone_ = self._make_backbone().to(self.device_)
        (patches,) = extract_features(
            self.backbone_,
            images,
            self.device_,
            self.batch_size,
            transform=lambda feats: aggregate_patches(feats, self.patch_size).permute(0, 2, 3, 1).flatten(0, 2),
            progress=self.progress,
        )
        n_select = max(1, int(round(self.coreset_ratio * patches.shape[0])))
        if self.max_bank_size:
            n_select = min(n_select, self.max_bank_size)
        if self.coreset_candidates and self.coreset_candidates < patches.shape[0]:
            keep = torch.randperm(patches.shape[0], generator=torch.Generator().manual_seed(self.seed))
            patches = patches[keep[: self.coreset_candidates]]
        n_select = min(n_select, patches.shape[0])
        index = greedy_coreset(patches.to(self.device_), n_select, self.projection_dim, self.seed)
        self.net_ = PatchCoreNet(self.backbone_, n_select, patches.shape[1], self.patch_size).to(self.device_)
        self.net_.memory_bank.copy_(patches[index.cpu()].to(self.device_))
        self.net_.eval()

    def _score(self, images: Tensor) -> AnomalyScores:
        distances = self.net_(images)
        maps = gaussian_blur(upsample(distances, images.shape[-2:]), self.sigma)
        return AnomalyScores(image_score(maps, self.image_pooling), maps)

    def _modules(self) -> dict[str, nn.Module]:
        return {"net": self.net_}

    def _meta(self) -> dict[str, Any]:
        return {"bank_size": int(self.net_.memory_bank.shape[0]), "feature_dim": int(self.net_.memory_bank.shape[1])}

    def _build(self, meta: dict[str, Any]) -> None:
        self.backbone_ = self._make_backbone()
        self.net_ = PatchCoreNet(self.backbone_, meta["bank_size"], meta["feature_dim"], self.patch_size)
