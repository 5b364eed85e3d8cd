"""DEFEND (DEnse FEature fine-tuning on Normal Data): the teacher's last blocks are fine-tuned so that patches of
the same object get the same prototype assignment in an image and in a random crop of it.

Per image: a random crop is taken and resized; both go through the teacher, and their spatial tokens through a
3-layer MLP head (L2-normalised output); cosine similarities to learnable prototypes give per-position scores.
Sinkhorn-Knopp (SwAV's equipartitioned optimal transport) turns each view's scores into soft cluster
assignments, the targets. The image's scores and targets are resampled onto the crop's grid (the overlapping
region: the crop lies inside the image), and the loss is the cross-entropy, at temperature 0.1, between each
view's targets and the other view's scores there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omniad.distributed import sum_over_ranks


class ProjectionHead(nn.Module):
    """Three linear layers with GELU between them; L2-normalised output (the paper: hidden 2048, out 256)."""

    def __init__(self, in_dim: int, hidden: int = 2048, out_dim: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, out_dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.mlp(x), dim=-1)


class DefendNet(nn.Module):
    """The teacher, the projection head and the prototypes: (images, crops) -> per-position cosine similarities
    to every prototype, (B, K, h, w) and (B, K, h_c, w_c). One forward for both views, so that the loop may wrap
    it in DistributedDataParallel.

    Args:
        teacher: images in [0, 1] -> a list of stage maps; the last one is used (its trainable part is whatever
            the caller left ``requires_grad``).
        channels: channels of the teacher's last map.
        n_prototypes: number of learnable prototypes K.
        hidden: hidden width of the head.
        out_dim: output width of the head and of the prototypes.
    """

    def __init__(self, teacher: nn.Module, channels: int, n_prototypes: int, hidden: int = 2048,
                 out_dim: int = 256) -> None:
        super().__init__()
        self.teacher = teacher
        self.head = ProjectionHead(channels, hidden, out_dim)
        self.prototypes = nn.Parameter(torch.randn(n_prototypes, out_dim))

    def similarities(self, images: Tensor) -> Tensor:
        tokens = self.head(self.teacher(images)[-1].permute(0, 2, 3, 1))  # (B, h, w, D), unit length
        return (tokens @ F.normalize(self.prototypes, dim=1).T).permute(0, 3, 1, 2)

    def forward(self, images: Tensor, crops: Tensor) -> tuple[Tensor, Tensor]:
        return self.similarities(images), self.similarities(crops)


@torch.no_grad()
def sinkhorn_knopp(scores: Tensor, epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    """SwAV's Sinkhorn-Knopp: (N, K) similarity scores -> (N, K) soft assignments whose rows each sum to 1 and
    whose columns each sum to N / K (every prototype gets an equal share), i.e. N x a doubly stochastic
    transport plan, more exactly the more ``iterations``. Under torch.distributed the N samples are those of
    every rank together (SwAV's all-reduced sums), so the targets are those of one process on the whole batch.

    Args:
        scores: (N, K) cosine similarities of N samples to K prototypes (in [-1, 1]: no shift is needed before
            the exponential, in float64).
        epsilon: entropic regularisation (SwAV: 0.05); lower is closer to a hard assignment.
        iterations: alternating normalisations (SwAV: 3).
    """
    q = torch.exp(scores.double() / epsilon).T  # (K, N)
    k = q.shape[0]
    n = float(sum_over_ranks(torch.tensor([q.shape[1]], dtype=torch.float64))[0])
    q /= sum_over_ranks(q.sum())
    for _ in range(iterations):
        q /= sum_over_ranks(q.sum(dim=1, keepdim=True)) * k  # every prototype: total mass 1 / K
        q /= q.sum(dim=0, keepdim=True) * n  # every sample: total mass 1 / N
    return (q * n).T.to(scores.dtype)


def random_boxes(batch: int, scale: tuple[float, float], generator: torch.Generator) -> Tensor:
    """(B, 4) square crop boxes (x0, y0, x1, y1) in grid_sample's [-1, 1] coordinates, each covering a share of
    the image's area drawn uniformly from ``scale``, at a uniformly random place inside the image."""
    area, x, y = torch.rand(batch, 3, generator=generator).T  # row i: box i, whatever the batch size
    area = scale[0] + (scale[1] - scale[0]) * area
    side = 2 * area.sqrt()
    x0, y0 = -1 + (2 - side) * x, -1 + (2 - side) * y
    return torch.stack([x0, y0, x0 + side, y0 + side], dim=1)


def crop_resize(x: Tensor, boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resampling of each (C, H, W) map's box onto a ``size`` grid (cell centres inside the box): the crop
    of an image, or an image's maps on a crop's grid."""
    b = x.shape[0]
    theta = torch.zeros(b, 2, 3, dtype=x.dtype, device=x.device)
    boxes = boxes.to(x.device, x.dtype)
    theta[:, 0, 0] = (boxes[:, 2] - boxes[:, 0]) / 2
    theta[:, 0, 2] = (boxes[:, 2] + boxes[:, 0]) / 2
    theta[:, 1, 1] = (boxes[:, 3] - boxes[:, 1]) / 2
    theta[:, 1, 2] = (boxes[:, 3] + boxes[:, 1]) / 2
    grid = F.affine_grid(theta, [b, x.shape[1], *size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _assignments(similarities: Tensor, epsilon: float, iterations: int) -> Tensor:
    """(B, K, h, w) similarities -> (B, K, h, w) Sinkhorn targets over all the batch's positions."""
    b, k, h, w = similarities.shape
    q = sinkhorn_knopp(similarities.permute(0, 2, 3, 1).reshape(-1, k), epsilon, iterations)
    return q.reshape(b, h, w, k).permute(0, 3, 1, 2)


def dense_loss(image_sims: Tensor, crop_sims: Tensor, boxes: Tensor, temperature: float = 0.1,
               epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    """DEFEND's loss on one batch: the two views' swapped cross-entropies on the crop's region.

    Args:
        image_sims: (B, K, h, w) prototype similarities of the whole images.
        crop_sims: (B, K, h_c, w_c) those of the crops.
        boxes: (B, 4) where each crop was taken ([-1, 1] coordinates, as ``random_boxes``).
        temperature: of the softmax over prototypes (paper 0.1).
        epsilon: Sinkhorn regularisation.
        iterations: Sinkhorn iterations.
    """
    grid = tuple(crop_sims.shape[-2:])
    image_on_crop = crop_resize(image_sims, boxes, grid)
    with torch.no_grad():
        # a convex combination of assignments is an assignment: targets resampled like the scores
        image_targets = crop_resize(_assignments(image_sims, epsilon, iterations), boxes, grid)
        crop_targets = _assignments(crop_sims, epsilon, iterations)

    def cross_entropy(targets: Tensor, sims: Tensor) -> Tensor:
        return -(targets * F.log_softmax(sims / temperature, dim=1)).sum(1).mean()

    return 0.5 * (cross_entropy(image_targets, crop_sims) + cross_entropy(crop_targets, image_on_crop))


def last_blocks(model: nn.Module, count: int) -> list[nn.Module]:
    """The last ``count`` residual blocks that a timm feature extractor runs up to its last returned map, in
    order: the blocks inside the stages of ``model.blocks`` (EfficientNet, MobileNet), the transformer blocks of a
    ViT, or those of ``layer1..4`` (ResNet). timm's EfficientNet extractors keep (and run) the stages after the
    last returned one, which do not shape it: they are not counted."""
    last = model.feature_info.module_name()[-1]  # e.g. "blocks.4" or "layer3"
    model = getattr(model, "model", model)  # timm wraps a ViT extractor (FeatureGetterNet): its blocks are inside
    if hasattr(model, "blocks"):
        stop = int(last.split(".")[1]) + 1 if last.startswith("blocks.") else 0
        stages = list(model.blocks)[:stop]
    else:
        stages = []
        for name, module in model.named_children():
            if name.startswith("layer"):
                stages.append(module)
            if name == last:
                break
    blocks = [b for stage in stages for b in (stage if isinstance(stage, nn.Sequential) else [stage])]
    if count > len(blocks):
        raise ValueError(f"{count} teacher blocks asked to fine-tune, but {type(model).__name__} has only "
                         f"{len(blocks)} before its feature map {last!r}")
    return blocks[-count:]


__all__ = ["DefendNet", "ProjectionHead", "crop_resize", "dense_loss", "last_blocks", "random_boxes",
           "sinkhorn_knopp"]
