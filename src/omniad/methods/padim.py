"""PaDiM (Defard et al., ICPR 2021): a multivariate Gaussian of the patch embedding at every position; a patch is
as anomalous as its Mahalanobis distance to its position's Gaussian.

Trained unified: one Gaussian per position over the images of every product type, no labels. The statistics are
accumulated batch by batch, so the backbone runs once per training image and no feature cache is held.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from omniad.backbone import Backbone
from omniad.distributed import sum_over_ranks
from omniad.features import fuse_stages
from omniad.methods.base import BaseDetector
from omniad.params import POSITIVE_INT, Each, Interval
from omniad.registry import register_detector


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
        """(B, 3, H, W) -> (B, positions, d): the selected channels of the fused stages at each position.

        Each stage's kept channels are taken before it is up-sampled to the first stage's grid: the same values
        as selecting from the fused stages (interpolation acts channel by channel), for half the interpolation
        and concatenation (176 channels fused, 100 kept, with lite0's stages 1-3)."""
        stages = self.backbone(images)
        picked = self._stage_indices([f.shape[1] for f in stages], images.device)
        if picked is None:
            emb = fuse_stages(stages).index_select(1, self.channel_index)
        else:
            emb = fuse_stages([f.index_select(1, i) for f, i in zip(stages, picked, strict=True) if i.numel()],
                              size=tuple(stages[0].shape[-2:]))
        return emb.flatten(2).transpose(1, 2)

    def _stage_indices(self, channels: list[int], device: torch.device) -> list[Tensor] | None:
        """``channel_index`` split by stage (indices within each stage), or None when it is not sorted (then the
        split would reorder the channels). Cached per index; made through numpy so that a traced graph holds
        the split as constants."""
        key = (self.channel_index.data_ptr(), self.channel_index._version, tuple(channels), device)
        if getattr(self, "_split_key", None) != key:
            index = self.channel_index.detach().cpu().numpy()
            bounds = np.cumsum([0, *channels])
            split = None
            if (np.diff(index) > 0).all():
                split = [torch.from_numpy(index[(index >= lo) & (index < hi)] - lo).to(device)
                         for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
            self._split, self._split_key = split, key
        return self._split

    def distances(self, emb: Tensor) -> Tensor:
        """(B, positions, d) embeddings -> (B, h, w) Mahalanobis distances to each position's Gaussian."""
        diff = (emb - self.mean).transpose(0, 1)  # (positions, B, d)
        # one batched matmul over positions, then a row-wise dot: a three-operand einsum exported to OpenVINO
        # expanded a (B, positions, d, d) intermediate (11 GB peak for 16 images at 256 px; benchmarks/speed.py)
        d2 = (torch.bmm(diff, self.precision) * diff).sum(-1).transpose(0, 1).clamp_min(0)
        return d2.sqrt().view(emb.shape[0], *self.grid)

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, h, w) Mahalanobis distances to each position's Gaussian."""
        return self.distances(self.embed(images))


@register_detector("padim")
class PaDiM(BaseDetector):
    """PaDiM, fitted unified on every product type at once.

    Args:
        stages: backbone feature indices (paper: ResNet layers 1-3; (1, 2, 3) = strides 4, 8, 16 for EfficientNets).
        n_features: channels kept by the paper's random dimensionality reduction (100 for ResNet18, 550 for
            WRN50; capped at the backbone's total channels).
        epsilon: regularisation added to each covariance's diagonal (paper: 0.01).
        **common: see ``BaseDetector`` (PaDiM's defaults: sigma 4, image_pooling "max", the paper's).
    """

    test_params: dict[str, Any] = {}
    defaults = {"sigma": 4.0, "image_pooling": "max"}
    constraints = {"stages": Each(Interval(0, None, integer=True)), "n_features": POSITIVE_INT,
                   "epsilon": Interval(0.0, None, low_open=True)}
    memorises_training = True  # its model of normality fits its own training images (CADA: out-of-fold targets)
    cache_features = False  # one float64 Gaussian per position, accumulated batch by batch: no cache needed

    def __init__(
        self,
        *,
        stages: tuple[int, ...] = (1, 2, 3),
        n_features: int = 100,
        epsilon: float = 0.01,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        self.stages = stages
        self.n_features = n_features
        self.epsilon = epsilon

    def features(self, images: Tensor) -> Tensor:
        return self.net_.embed(images)

    def prepare(self) -> PaDiM:
        super().prepare()
        total = sum(self.backbone_.channels)
        d = min(self.resolved_.n_features, total)
        generator = torch.Generator().manual_seed(self.seed)
        channel_index = torch.randperm(total, generator=generator)[:d].sort().values
        with torch.no_grad():
            grid = tuple(self.backbone_(torch.zeros(1, 3, *self.input_hw, device=self.device_))[0]
                         .shape[-2:])
        self.net_ = PaDiMNet(self.backbone_, channel_index, grid).to(self.device_)
        return self

    @torch.no_grad()
    def train_features(self, features) -> None:
        count, sum_x, sum_xx = 0, None, None
        for emb in features:
            emb = emb.double()  # float64 sums: one-pass covariance loses precision in float32
            sum_x = emb.sum(0) if sum_x is None else sum_x + emb.sum(0)
            outer = torch.einsum("bpc,bpd->pcd", emb, emb)
            sum_xx = outer if sum_xx is None else sum_xx + outer
            count += emb.shape[0]
        # several processes: each summed its shard of the images; the Gaussians need the sums of all of them
        sum_x, sum_xx = sum_over_ranks(sum_x), sum_over_ranks(sum_xx)
        count = int(sum_over_ranks(torch.tensor([count]))[0])
        d = sum_x.shape[-1]
        mean = sum_x / count
        cov = (sum_xx - count * torch.einsum("pc,pd->pcd", mean, mean)) / max(count - 1, 1)
        cov += self.resolved_.epsilon * torch.eye(d, dtype=cov.dtype, device=cov.device)
        self.net_.mean.copy_(mean.float())
        self.net_.precision.copy_(torch.linalg.inv(cov).float())
        self.net_.eval()

    def score_features(self, features: Tensor) -> Tensor:
        return self.net_.distances(features)

    def modules(self) -> dict[str, nn.Module]:
        return {"net": self.net_}

    def meta(self) -> dict[str, Any]:
        return {"n_channels": int(self.net_.channel_index.numel()), "grid": list(self.net_.grid)}

    def build(self, meta: dict[str, Any]) -> None:
        index = torch.zeros(meta["n_channels"], dtype=torch.long)
        self.net_ = PaDiMNet(self.backbone_, index, tuple(meta["grid"]))
