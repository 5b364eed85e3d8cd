"""PaDiM (Defard et al., ICPR 2021): a multivariate Gaussian of the patch embedding at every position; a patch is
as anomalous as its Mahalanobis distance to its position's Gaussian.

Trained unified: one Gaussian per position over the images of every product type, no labels. The statistics are
accumulated batch by batch, so the backbone runs once per training image and no feature cache is held.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from omniad.backbone import Backbone
from omniad.data.sources import iterate_batches
from omniad.features import fuse_stages
from omniad.methods.base import BaseDetector
from omniad.postprocess import gaussian_blur, image_score, upsample
from omniad.registry import register_detector
from omniad.types import AnomalyScores


class PaDiMNet(nn.Module):
    """Images -> (B, h, w) Mahalanobis distance map. Pure: the Gaussians are buffers filled by the detector."""

    def __init__(self, backbone: Backbone, channel_index: Tensor, grid: tuple[int, int]) -> None:
        super().__init__()
        self.backbone = backbone
        d, positions = channel_index.numel(), grid[0] * grid[1]
        self.grid = tuple(grid)
        self.register_buffer("channel_index", channel_index.clone())
        self.register_buffer("mean", torch.zeros(positions, d))
        self.register_buffer("precision", torch.zeros(positions, d, d))

    def embed(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, positions, d): the selected channels of the fused stages at each position."""
        emb = fuse_stages(self.backbone(images)).index_select(1, self.channel_index)
        return emb.flatten(2).transpose(1, 2)

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, h, w) Mahalanobis distances to each position's Gaussian."""
        emb = self.embed(images)
        if emb.shape[1] != self.mean.shape[0]:
            # one Gaussian per position: other image sizes give another grid (and an opaque einsum error)
            raise ValueError(
                f"PaDiM was fitted on images whose feature grid is {self.grid[0]}x{self.grid[1]}; images of size "
                f"{tuple(images.shape[-2:])} give another grid: score images of the training size"
            )
        diff = emb - self.mean
        d2 = torch.einsum("bpc,pcd,bpd->bp", diff, self.precision, diff).clamp_min(0)
        return d2.sqrt().view(images.shape[0], *self.grid)


@register_detector("padim")
class PaDiM(BaseDetector):
    """PaDiM, fitted unified on every product type at once.

    Args:
        stages: backbone feature indices (paper: ResNet layers 1-3; (1, 2, 3) = strides 4, 8, 16 for EfficientNets).
        n_features: channels kept by the paper's random dimensionality reduction (100 for ResNet18, 550 for
            WRN50; capped at the backbone's total channels).
        epsilon: regularisation added to each covariance's diagonal (paper: 0.01).
        sigma: Gaussian smoothing of the up-sampled map (protocol: 4).
        image_pooling: "max" (paper), "top1" (protocol) or "maxpool".
        **common: see ``BaseDetector``.
    """

    # settings small enough for the contract test on the tiny synthetic set (seconds on a 2-core CPU)
    test_params: dict[str, Any] = {}

    def __init__(
        self,
        *,
        stages: tuple[int, ...] = (1, 2, 3),
        n_features: int = 100,
        epsilon: float = 0.01,
        sigma: float = 4.0,
        image_pooling: str = "max",
        **common: Any,
    ) -> None:
        super().__init__(**common)
        self.stages = tuple(stages)
        self.n_features = n_features
        self.epsilon = epsilon
        self.sigma = sigma
        self.image_pooling = image_pooling

    def _make_backbone(self) -> Backbone:
        return Backbone(self.backbone, self.stages, "random" if self._loading else self.weights)

    @torch.no_grad()
    def _fit(self, images) -> None:
        self.backbone_ = self._make_backbone().to(self.device_)
        total = sum(self.backbone_.channels)
        d = min(self.n_features, total)
        generator = torch.Generator().manual_seed(self.seed)
        channel_index = torch.randperm(total, generator=generator)[:d].sort().values
        net = None
        count, sum_x, sum_xx = 0, None, None
        for batch in iterate_batches(images, self.batch_size, self.progress, "PaDiM statistics"):
            batch = batch.to(self.device_)
            if net is None:
                grid = tuple(self.backbone_(batch[:1])[0].shape[-2:])
                net = PaDiMNet(self.backbone_, channel_index, grid).to(self.device_)
            emb = net.embed(batch).double()  # float64 sums: one-pass covariance loses precision in float32
            sum_x = emb.sum(0) if sum_x is None else sum_x + emb.sum(0)
            outer = torch.einsum("bpc,bpd->pcd", emb, emb)
            sum_xx = outer if sum_xx is None else sum_xx + outer
            count += emb.shape[0]
        mean = sum_x / count
        cov = (sum_xx - count * torch.einsum("pc,pd->pcd", mean, mean)) / max(count - 1, 1)
        cov += self.epsilon * torch.eye(d, dtype=cov.dtype, device=cov.device)
        net.mean.copy_(mean.float())
        net.precision.copy_(torch.linalg.inv(cov).float())
        self.net_ = net.eval()

    def _score(self, images: Tensor) -> AnomalyScores:
        maps = gaussian_blur(upsample(self.net_(images), images.shape[-2:]), self.sigma)
        return AnomalyScores(image_score(maps, self.image_pooling), maps)

    def _modules(self) -> dict[str, nn.Module]:
        return {"net": self.net_}

    def _meta(self) -> dict[str, Any]:
        return {"n_channels": int(self.net_.channel_index.numel()), "grid": list(self.net_.grid)}

    def _build(self, meta: dict[str, Any]) -> None:
        self.backbone_ = self._make_backbone()
        index = torch.zeros(meta["n_channels"], dtype=torch.long)
        self.net_ = PaDiMNet(self.backbone_, index, tuple(meta["grid"]))
