"""PatchCore's coreset: which training patches its memory bank keeps.

Two searches, both greedy k-center (Sener & Savarese) on a seeded random projection of the patches, as PatchCore
does:

- ``greedy_coreset``: the paper's. Every one of the k selected centres reads every patch, so with a fixed ratio
  (k = ratio x N) the work is ratio x N^2: 49 min for 2,204 images at 1%, 17 h projected for 10,000. It needs the
  projected patches of the whole set in memory. With a process group each rank holds a shard of them and the next
  centre is the global arg-max, one collective per centre (``ShardedGreedy``); the coreset equals one process's.
- ``StreamingCoreset`` (the default): the patches arrive batch by batch in the training set's order and are cut
  into consecutive chunks of ``chunk_size``. Each chunk runs the same greedy search, started from the distances of
  its patches to the last ``memory`` bank entries (so it does not cover again what earlier chunks covered), and
  stops once its patches lie within the covering radius the previous chunk reached, keeping the budget it did not
  need for later chunks (a new product type then gets more centres than a repeat of a known one); a chunk that
  stops early aims a little closer next time. A chunk is never revisited, so the chunks cannot hand budget back to
  an earlier product type that needed more; a ``reserve`` (half the budget, at most ``reserve_cap`` centres) is
  therefore held back and spent at the end by the same greedy search over a pool of the ``pool_size`` patches
  that lay farthest from the bank, their distances measured again to the whole bank. Work: (chunk_size + memory)
  x a chunk's centres per chunk, plus a fixed pool x reserve search: linear in the images. Memory: two chunks, the
  pool and the bank. Measured on the real pair against the paper's search: benchmarks/results/scale.md.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from omniad.distributed import world
from omniad.training import progress_bar


def project(features: Tensor, matrix: Tensor | None) -> Tensor:
    """(N, D) features on the search's projection, float32."""
    features = features.float()
    return features if matrix is None else features @ matrix.to(features.device)


def _greedy_on_projected(projected: Tensor, n_select: int, first: int, progress: Any = None,
                         min_d2: Tensor | None = None, stop_d2: float | None = None,
                         min_select: int = 0) -> tuple[Tensor, float, Tensor]:
    """Greedy k-center on (N, d) projected points from the centre ``first``.

    Args:
        min_d2: squared distances of the points to centres chosen before (which they then need not cover again).
        stop_d2: stop early once every point lies within this squared distance of a centre, after at least
            ``min_select`` centres.

    Returns:
        The selected indices in order (n_select of them, or fewer when stopped early), the squared covering
        radius reached (the largest squared distance of a point to its nearest centre) and every point's squared
        distance to its nearest centre.
    """
    n = projected.shape[0]
    sq_norms = (projected * projected).sum(1)
    selected = torch.empty(n_select, dtype=torch.long)
    current = first
    if min_d2 is None:
        min_d2 = torch.full((n,), float("inf"), device=projected.device)
    d2 = torch.empty_like(min_d2)
    count = 0
    for i in range(n_select):
        if stop_d2 is not None and count >= min_select and float(min_d2[current]) <= stop_d2:
            break
        selected[i] = current
        count += 1
        # |x - c|^2 - |c|^2 = |x|^2 - 2 x.c in one fused pass over the data (memory-bound on a CPU)
        torch.addmv(sq_norms, projected, projected[current], alpha=-2, out=d2)
        d2 += sq_norms[current]
        torch.minimum(min_d2, d2, out=min_d2)
        current = int(min_d2.argmax())
        if progress is not None:
            progress.update()
    return selected[:count], float(min_d2[current]), min_d2


def greedy_coreset(features: Tensor, n_select: int, projection_dim: int = 128, seed: int = 0,
                   progress: bool = False) -> Tensor:
    """Indices of the paper's greedy k-center coreset of (N, D) ``features``, searched on a seeded random
    projection to ``projection_dim`` (0: none), which keeps each step to one pass over N x projection_dim numbers.
    One process; ``ShardedGreedy`` shares the same search between processes."""
    n, dim = features.shape
    n_select = max(1, min(n_select, n))
    matrix, first = _projection_and_first(dim, n, projection_dim, seed)
    bar = progress_bar(n_select, progress, "coreset (greedy)", "centre")
    try:
        return _greedy_on_projected(project(features, matrix), n_select, first, bar)[0]
    finally:
        bar.close()


def _projection_and_first(dim: int, n: int, projection_dim: int, seed: int) -> tuple[Tensor | None, int]:
    """The paper search's projection matrix and first centre, drawn from one generator in this order."""
    generator = torch.Generator().manual_seed(seed)
    matrix = None
    if projection_dim and projection_dim < dim:
        matrix = torch.randn(dim, projection_dim, generator=generator) / math.sqrt(projection_dim)
    return matrix, int(torch.randint(n, (1,), generator=generator))


class ShardedGreedy:
    """The paper's greedy k-center search shared by the processes of a group: each rank holds the projected
    patches of its own images and their minimum distances; each step every rank offers its farthest patch and the
    global arg-max (ties: the lowest global index, as ``argmax`` picks) becomes the next centre, in one
    ``all_gather`` of (distance, global index, projected point, full point). The coreset equals one process's on
    the whole set in that set's order (tested with two gloo processes).

    Args:
        local: (n_local, D) this rank's patches, in the order of ``global_index``.
        global_index: (n_local,) each local patch's index in the one-process order.
        n_total: the number of patches over every rank.
        projection_dim, seed: as ``greedy_coreset`` (the same projection and first centre).
    """

    def __init__(self, local: Tensor, global_index: Tensor, n_total: int, projection_dim: int = 128,
                 seed: int = 0) -> None:
        self.local, self.global_index, self.n_total = local.float(), global_index.long(), n_total
        self.matrix, self.first = _projection_and_first(local.shape[1], n_total, projection_dim, seed)

    def select(self, n_select: int, progress: bool = False) -> tuple[Tensor, Tensor]:
        """(n_select,) global indices in selection order and the (n_select, D) selected patches, on every rank."""
        n_select = max(1, min(n_select, self.n_total))
        projected = project(self.local, self.matrix)
        sq_norms = (projected * projected).sum(1)
        min_d2 = torch.full((projected.shape[0],), float("inf"))
        d2 = torch.empty_like(min_d2)
        rows = {int(g): i for i, g in enumerate(self.global_index)}
        pdim = projected.shape[1]
        offer = torch.zeros(3 + pdim + self.local.shape[1], dtype=torch.float64)
        offers = [torch.empty_like(offer) for _ in range(world()[1])]

        def share(row: int | None, distance: float) -> Tensor:
            """Every rank's offer gathered: this rank offers ``row`` (or nothing) at ``distance``."""
            offer.zero_()
            offer[0], offer[1] = -1.0, float(self.n_total)
            if row is not None:
                offer[0], offer[1], offer[2] = distance, float(self.global_index[row]), float(sq_norms[row])
                offer[3 : 3 + pdim] = projected[row].double()
                offer[3 + pdim :] = self.local[row].double()
            dist.all_gather(offers, offer)
            return max(offers, key=lambda o: (float(o[0]), -float(o[1])))  # farthest; ties: lowest index

        chosen = torch.empty(n_select, dtype=torch.long)
        bank = torch.empty(n_select, self.local.shape[1])
        centre = share(rows.get(self.first), 0.0)
        bar = progress_bar(n_select, progress, "coreset (greedy, sharded)", "centre")
        for i in range(n_select):
            chosen[i], bank[i] = int(centre[1]), centre[3 + pdim :].float()
            torch.addmv(sq_norms, projected, centre[3 : 3 + pdim].float(), alpha=-2, out=d2)
            d2 += float(centre[2])
            torch.minimum(min_d2, d2, out=min_d2)
            bar.update()
            if i + 1 < n_select:
                best = int(min_d2.argmax()) if min_d2.numel() else None
                centre = share(best, float(min_d2[best]) if best is not None else -1.0)
        bar.close()
        return chosen, bank


class StreamingCoreset:
    """Greedy k-center over consecutive chunks of the patches as they arrive, the chunks' coresets joined (see the
    module's docstring). ``add`` batches of (n, D) patches in the training set's order, then ``finish``.

    Args:
        ratio: share of the patches kept, in (0, 1].
        chunk_size: patches per chunk (the last chunk takes what is left: one to two chunks' worth).
        projection_dim: dimension of the random projection each chunk's search runs on.
        seed: seeds the projection and the first chunk's first centre.
        total: the number of patches that will arrive, when known (the progress bar's estimate of the time left).
        progress: show a progress bar over the patches searched.
        memory: bank entries (the latest) a chunk's search starts from; 0: every chunk on its own.
        reserve: share of the budget held back for the end, spent where the whole bank covers worst (at most
            ``reserve_cap`` centres; none when ``pool_size`` is 0 or ``ratio`` is above 0.5).
        reserve_cap: the most centres held back (bounds the final search, so the whole stays linear).
        pool_size: farthest patches kept for the reserve's search.

    The budget is kept on the running total: after each chunk the bank holds at most round(ratio x patches seen)
    entries less the reserve, and the saving a chunk may leave is capped so that the pool can absorb it: the bank
    ends at round(ratio x N) whatever the chunking. A set of fewer than two chunks is one chunk with no reserve:
    the paper's coreset.
    """

    def __init__(self, ratio: float, chunk_size: int = 16384, projection_dim: int = 128, seed: int = 0,
                 total: int | None = None, progress: bool = False, memory: int = 4096, reserve: float = 0.5,
                 reserve_cap: int = 4096, pool_size: int = 16384) -> None:
        if not 0 < ratio <= 1:
            raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
        if chunk_size < 1 or memory < 0:
            raise ValueError(f"coreset chunk_size must be >= 1 and memory >= 0, got {chunk_size} and {memory}")
        self.ratio, self.chunk_size, self.projection_dim, self.seed = ratio, chunk_size, projection_dim, seed
        if not 0 <= reserve < 1 or reserve_cap < 0 or pool_size < 0:
            raise ValueError(f"coreset reserve must be in [0, 1) and reserve_cap, pool_size >= 0, got {reserve}, "
                             f"{reserve_cap}, {pool_size}")
        self.memory = memory
        # without a pool there is nothing to spend a reserve on; above ratio 0.5 the pool could run short of it
        self.reserve, self.reserve_cap = (reserve, reserve_cap) if pool_size and ratio <= 0.5 else (0.0, 0)
        self.pool_size = pool_size if self.reserve_cap and self.reserve else 0
        self.pool: tuple[Tensor, Tensor, Tensor] | None = None  # (full, projected, squared distance) of far patches
        self.matrix: Tensor | None = None
        self.buffer: list[Tensor] = []
        self.buffered = 0
        self.seen = 0
        self.chunks = 0
        self.kept: list[Tensor] = []
        self.n_kept = 0
        self.recent: Tensor | None = None  # projected bank entries of the last chunks, at most ``memory``
        self.radius2: float | None = None  # the squared covering radius the next chunk aims at
        self.tighten = 0.9
        self.bar = progress_bar(total, progress, "coreset (chunked)", "patch")

    def add(self, patches: Tensor) -> None:
        """Take (n, D) more patches; every full chunk is reduced at once."""
        if patches.dim() != 2:
            raise ValueError(f"patches must be (n, D), got {tuple(patches.shape)}")
        if self.matrix is None and self.seen == 0 and not self.buffer:
            self.matrix, _ = _projection_and_first(patches.shape[1], 1, self.projection_dim, self.seed)
        self.buffer.append(patches.detach().float().cpu())
        self.buffered += patches.shape[0]
        # a chunk is reduced once another whole chunk waits behind it, so that finish()'s last chunk has at least
        # chunk_size patches (or all there are) to spend the budget still left on
        while self.buffered >= 2 * self.chunk_size:
            rows = torch.cat(self.buffer)
            self._reduce(rows[: self.chunk_size])
            rest = rows[self.chunk_size :]
            self.buffer, self.buffered = ([rest] if rest.shape[0] else []), rest.shape[0]

    def finish(self) -> Tensor:
        """The (K, D) bank: every chunk's coreset in chunk order, then the reserve's centres (K = round(ratio x N),
        at least 1)."""
        if self.buffered:
            self._reduce(torch.cat(self.buffer), last=True)
            self.buffer, self.buffered = [], 0
        if self.seen == 0:
            raise ValueError("the coreset search received no patches")
        left = max(1, round(self.ratio * self.seen)) - self.n_kept
        if left > 0 and self.pool is not None:
            # the reserve goes where the whole bank covers worst: greedy over the pool of the farthest patches,
            # their distances now measured to every bank entry
            full, projected, _ = self.pool
            if self.kept:
                bank = project(torch.cat(self.kept), self.matrix)
                min_d2 = torch.cat([torch.cdist(part, bank).amin(1) for part in projected.split(4096)]).square()
            else:  # every centre so far was held back (a tiny ratio): the pool's search starts from nothing
                min_d2 = torch.full((projected.shape[0],), float("inf"))
            index, _, _ = _greedy_on_projected(projected, min(left, projected.shape[0]), int(min_d2.argmax()),
                                               min_d2=min_d2)
            self.kept.append(full[index])
            self.n_kept += int(index.numel())
        self.bar.close()
        return torch.cat(self.kept)

    def _reserved(self) -> int:
        """Centres held back from the chunks for the end (a share of the running budget, at most reserve_cap)."""
        return min(round(self.reserve * self.ratio * self.seen), self.reserve_cap) if self.pool_size else 0

    def _nominate(self, chunk: Tensor, projected: Tensor, covered: Tensor) -> None:
        """Keep the pool_size patches seen so far that lay farthest from the bank when their chunk was done."""
        full, proj, d2 = (chunk, projected, covered) if self.pool is None else (
            torch.cat([self.pool[0], chunk]), torch.cat([self.pool[1], projected]), torch.cat([self.pool[2], covered]))
        if d2.shape[0] > self.pool_size:
            top = d2.topk(self.pool_size).indices
            full, proj, d2 = full[top], proj[top], d2[top]
        self.pool = (full, proj, d2)

    def _reduce(self, chunk: Tensor, last: bool = False) -> None:
        self.seen += chunk.shape[0]
        only = last and self.chunks == 0  # the whole set is one chunk: the paper's search, no reserve
        target = max(1, round(self.ratio * self.seen)) - (0 if only else self._reserved())
        available = min(chunk.shape[0], target - self.n_kept)
        covered = None
        if available > 0:
            projected = project(chunk, self.matrix)
            stop = None
            if self.recent is None:  # the first chunk draws as the paper's search: a set within it gets its coreset
                seed = self.seed + self.chunks
                _, first = _projection_and_first(chunk.shape[1], chunk.shape[0], self.projection_dim, seed)
                min_d2 = None
            else:  # later chunks start from what the recent bank entries cover already, at its farthest patch
                min_d2 = torch.cdist(projected, self.recent).amin(1).square()
                first = int(min_d2.argmax())
                stop = None if last or self.radius2 is None else self.radius2
            # the saving a chunk may leave is capped, so that the last chunk can always spend it
            must = max(0, available - int((1 - self.ratio) * self.chunk_size) // 2)
            index, reached, covered = _greedy_on_projected(projected, available, first, min_d2=min_d2,
                                                           stop_d2=stop, min_select=must)
            if stop is not None and index.numel() < available:
                # covered to the radius with budget to spare: aim a little closer, so the saving gets spent
                self.radius2 = stop * self.tighten
            else:
                self.radius2 = reached
            self.kept.append(chunk[index])
            self.n_kept += int(index.numel())
            chosen = projected[index]
            if self.memory:
                recent = chosen if self.recent is None else torch.cat([self.recent, chosen])
                self.recent = recent[-self.memory :]
        if not only and self.pool_size:
            projected = projected if available > 0 else project(chunk, self.matrix)
            if covered is None:  # nothing selected here: the distances to the recent bank entries
                covered = (torch.cdist(projected, self.recent).amin(1).square() if self.recent is not None
                           else torch.full((chunk.shape[0],), float("inf")))
            self._nominate(chunk, projected, covered)
        self.chunks += 1
        self.bar.update(chunk.shape[0])


__all__ = ["ShardedGreedy", "StreamingCoreset", "greedy_coreset", "project"]
