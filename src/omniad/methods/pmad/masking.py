"""PMAD's masks over a (h, w) grid of patches: random, block-wise (BEiT) and combinational masks for training;
prototype-guided proposal masking and the rounds that let every patch be predicted from its context at inference.

A mask is a (B, h * w) bool tensor, True = masked (hidden from the encoder, predicted by the decoder). Every mask
made here hides exactly the requested number of patches per image, so batches stay rectangular.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from omniad.runtime import is_exporting

TRAIN_MASKINGS = ("combined", "random", "blockwise")
INFERENCE_MASKINGS = ("proposal", "random", "blockwise")


def num_masked(num_patches: int, ratio: float) -> int:
    """Patches hidden at ``ratio``: round(ratio * N), at least 1 and at most N - 1 (the encoder needs context)."""
    if not 0 < ratio < 1:
        raise ValueError(f"a mask ratio must lie in (0, 1), got {ratio}")
    if num_patches < 2:
        raise ValueError(f"masking needs at least 2 patches, the grid has {num_patches}")
    return int(min(num_patches - 1, max(1, round(ratio * num_patches))))


def random_mask(batch: int, grid: tuple[int, int], count: int, rng: np.random.Generator) -> Tensor:
    """Hide ``count`` patches chosen uniformly at random in each image."""
    n = grid[0] * grid[1]
    mask = np.zeros((batch, n), dtype=bool)
    for row in mask:
        row[rng.choice(n, size=count, replace=False)] = True
    return torch.from_numpy(mask)


def blockwise_mask(
    batch: int,
    grid: tuple[int, int],
    count: int,
    rng: np.random.Generator,
    min_block: int = 4,
    min_aspect: float = 0.3,
) -> Tensor:
    """BEiT's block-wise masking: rectangles of random area (>= ``min_block`` patches) and aspect ratio in
    [min_aspect, 1 / min_aspect] are hidden until ``count`` patches are; when blocks no longer fit, the last
    few patches are drawn at random so that exactly ``count`` are hidden."""
    h, w = grid
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    out = np.zeros((batch, h * w), dtype=bool)
    for b in range(batch):
        mask = np.zeros((h, w), dtype=bool)
        hidden = 0
        while hidden < count:
            remaining = count - hidden
            added = 0
            for _attempt in range(10):
                area = rng.uniform(min_block, max(min_block, remaining))
                aspect = math.exp(rng.uniform(*log_aspect))
                bh = int(round(math.sqrt(area * aspect)))
                bw = int(round(math.sqrt(area / aspect)))
                if not (1 <= bh < h and 1 <= bw < w):
                    continue
                top = int(rng.integers(0, h - bh + 1))
                left = int(rng.integers(0, w - bw + 1))
                new = int((~mask[top : top + bh, left : left + bw]).sum())
                if 0 < new <= remaining:
                    mask[top : top + bh, left : left + bw] = True
                    added = new
                    break
            if added == 0:
                break
            hidden += added
        flat = mask.reshape(-1)
        if hidden < count:  # top up at random: blocks no longer fit
            free = np.flatnonzero(~flat)
            flat[rng.choice(free, size=count - hidden, replace=False)] = True
        out[b] = flat
    return torch.from_numpy(out)


def training_mask(
    batch: int, grid: tuple[int, int], ratio: float, strategy: str, rng: np.random.Generator
) -> Tensor:
    """Training masks at ``ratio``: "random", "blockwise", or "combined" (each image gets a random or a
    block-wise mask with probability 1/2, PMAD's combinational masking)."""
    count = num_masked(grid[0] * grid[1], ratio)
    if strategy == "random":
        return random_mask(batch, grid, count, rng)
    if strategy == "blockwise":
        return blockwise_mask(batch, grid, count, rng)
    if strategy == "combined":
        use_block = torch.from_numpy(rng.random(batch) < 0.5)
        return torch.where(
            use_block[:, None], blockwise_mask(batch, grid, count, rng), random_mask(batch, grid, count, rng)
        )
    raise ValueError(f"unknown training masking {strategy!r}; use one of {TRAIN_MASKINGS}")


def proposal_mask(distances: Tensor, ratio: float) -> Tensor:
    """Prototype-guided proposal mask: hide the top ``ratio`` share of patches by distance to the nearest nominal
    prototype (ties broken by patch index).

    Args:
        distances: (B, N) distance of each patch's feature to its nearest prototype.
        ratio: share m of patches to hide.
    """
    return masking_rounds(proposal_order(distances), num_masked(distances.shape[1], ratio))[0]


def proposal_order(distances: Tensor) -> Tensor:
    """(B, N) patch indices, most suspicious (farthest from every prototype) first; stable for ties."""
    if is_exporting():
        # the exporter cannot convert a stable sort; ONNX's TopK orders equal values by index, as a stable sort
        return distances.topk(int(distances.shape[1]), dim=1, largest=True, sorted=True).indices
    return torch.sort(distances, dim=1, descending=True, stable=True).indices


def masking_rounds(order: Tensor, count: int) -> list[Tensor]:
    """Split a per-image patch order into consecutive groups of ``count``: round r hides the patches ranked
    [r * count, (r + 1) * count). Together the rounds hide every patch exactly once.

    Args:
        order: (B, N) patch indices, a permutation per row.
        count: patches hidden per round (the last round may hide fewer).

    Returns:
        ceil(N / count) masks of shape (B, N).
    """
    # the patch count as a plain int (the grid is fixed), the batch as a size: the export traces both right
    b, n = order.shape[0], int(order.shape[1])
    rounds = []
    for start in range(0, n, count):
        chosen = order[:, start : start + count]
        # scatter of a tensor, not of a Python bool, which the ONNX exporter cannot trace; the same masks
        mask = torch.zeros(b, n, dtype=torch.bool, device=order.device)
        rounds.append(mask.scatter(1, chosen, torch.ones_like(chosen, dtype=torch.bool)))
    return rounds


def inference_rounds(
    strategy: str,
    distances: Tensor,
    grid: tuple[int, int],
    ratio: float,
    rng: np.random.Generator,
) -> list[Tensor]:
    """The masks PMAD predicts through at inference; every patch is hidden in exactly one round.

    Args:
        strategy: "proposal" (first round = the top m% by prototype distance, later rounds = the next m% bands of
            the same ranking), "random" or "blockwise" (first round random / block-wise m%, the rest in random
            groups of m%), for the paper's inference-masking ablation.
        distances: (B, N) prototype distances (used by "proposal" only).
        grid: the (h, w) patch grid.
        ratio: m, the share hidden per round.
        rng: seeds the random strategies.

    Returns:
        ceil(1 / m)-ish masks of shape (B, N).
    """
    b, n = distances.shape[0], int(distances.shape[1])  # see masking_rounds
    count = num_masked(n, ratio)
    if strategy == "proposal":
        order = proposal_order(distances)
    elif strategy in ("random", "blockwise"):
        first = (
            random_mask(b, grid, count, rng) if strategy == "random" else blockwise_mask(b, grid, count, rng)
        ).to(distances.device)
        jitter = torch.from_numpy(rng.random((b, n))).to(distances.device)
        # first-round patches first (priority >= 1), the rest in random order
        order = torch.sort(first.double() + jitter, dim=1, descending=True, stable=True).indices
    else:
        raise ValueError(f"unknown inference masking {strategy!r}; use one of {INFERENCE_MASKINGS}")
    return masking_rounds(order, count)


__all__ = [
    "INFERENCE_MASKINGS",
    "TRAIN_MASKINGS",
    "blockwise_mask",
    "inference_rounds",
    "masking_rounds",
    "num_masked",
    "proposal_mask",
    "proposal_order",
    "random_mask",
    "training_mask",
]
