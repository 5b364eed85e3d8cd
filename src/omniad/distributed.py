"""Several processes with torch.distributed (``torchrun --nproc-per-node N -m omniad fit ...``).

What the lifecycle does with them: ``BaseDetector.extract`` gives each rank a strided shard of the images and
gathers the features back in order, so every rank holds the same cache. Methods that stream (``cache_features =
False``) see their shard only: PaDiM sums its statistics over ranks; PatchCore's ranks search their own chunks
and gather the banks, or share the paper's one greedy search. ``training.train`` wraps the net in
DistributedDataParallel and gives each rank its share of every batch; only rank 0 writes files. NCCL on GPUs, gloo
on CPUs. Without an initialised process group every function here is the one-process identity.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process writes files and prints (rank 0)."""
    return world()[0] == 0


def init_from_env(device: str = "auto") -> bool:
    """Join the process group that ``torchrun`` describes in the environment (WORLD_SIZE > 1); NCCL when this
    process uses CUDA, else gloo. Returns whether a process group is up."""
    if dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return True


def _comm_device() -> torch.device:
    """Where collective tensors must live: CUDA for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard(n: int) -> list[int]:
    """This rank's items of ``n``: ``rank, rank + world, ...`` (strided, so shards differ by one item at most)."""
    rank, size = world()
    if n < size:
        raise ValueError(f"{n} items cannot be shared by {size} processes: use fewer processes or more images")
    return list(range(rank, n, size))


def gather_shards(local: Tensor, n: int) -> Tensor:
    """Every rank's strided shard (see ``shard``) of an (n, ...) tensor, joined back in the original order."""
    rank, size = world()
    if size == 1:
        return local
    counts = [len(range(r, n, size)) for r in range(size)]
    padded = local.new_zeros((counts[0], *local.shape[1:]))
    padded[: local.shape[0]] = local
    device = _comm_device()
    parts = [torch.empty_like(padded, device=device) for _ in range(size)]
    dist.all_gather(parts, padded.to(device))
    out = local.new_empty((n, *local.shape[1:]))
    for r, part in enumerate(parts):
        out[r::size] = part[: counts[r]].to(out.device)
    return out


def gather_rows(local: Tensor) -> Tensor:
    """Every rank's (n_r, ...) rows joined in rank order (ranks may hold different numbers of rows)."""
    rank, size = world()
    if size == 1:
        return local
    device = _comm_device()
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(size)]
    dist.all_gather(counts, torch.tensor([local.shape[0]], device=device))
    counts = [int(c) for c in counts]
    padded = local.new_zeros((max(counts), *local.shape[1:]), device=device)
    padded[: local.shape[0]] = local.to(device)
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)]).to(local.device)


def sum_over_ranks(value: Tensor) -> Tensor:
    """The element-wise sum of ``value`` over every rank (a copy; ``value`` itself is unchanged)."""
    if world()[1] == 1:
        return value
    total = value.detach().to(_comm_device()).clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.to(value.device)


def mean_over_ranks(value: float) -> float:
    """The mean of a number over every rank (for losses every rank reports alike)."""
    _, size = world()
    if size == 1:
        return value
    return float(sum_over_ranks(torch.tensor([value], dtype=torch.float64))[0]) / size


__all__ = ["gather_rows", "gather_shards", "init_from_env", "is_main", "mean_over_ranks", "shard", "sum_over_ranks",
           "world"]
