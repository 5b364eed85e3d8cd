"""The one optimisation loop every trained method uses (RD, ReContrast, UniAD, PMAD, CADA's regressor).

A method hands it its net, optimiser, an iterable of batches (usually index tensors into a feature cache) and a
function that turns a batch into a loss; the loop does the rest the same way for everyone: progress, gradient
clipping, a per-step schedule, a loss history, an error on a non-finite loss, an optional per-epoch callback,
and the net back in eval mode afterwards, even when interrupted. Under torch.distributed (``omniad.distributed``)
the net is wrapped in DistributedDataParallel and each rank trains on its strided share of every batch (the
same global batches on every rank, as a distributed sampler of them), so gradients are averaged over the whole
batch as in one process.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from omniad.distributed import is_main, mean_over_ranks, world


def batch_indices(n: int, batch_size: int, iterations: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Indices of ``iterations`` training batches: shuffled passes over ``n`` items, the incomplete tail of each
    pass dropped (as a DataLoader with drop_last); a set smaller than one batch gives whole-set batches."""
    batch_size = min(batch_size, n)
    done = 0
    while done < iterations:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]
            done += 1
            if done == iterations:
                return


def epoch_batches(n: int, batch_size: int, epochs: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Indices of every batch of ``epochs`` shuffled passes over ``n`` items (the last batch of a pass may be
    smaller): ``ceil(n / batch_size)`` batches per epoch."""
    for _ in range(epochs):
        yield from torch.randperm(n, generator=generator).split(batch_size)


def progress_bar(total: int, enabled: bool, desc: str, unit: str = "it"):
    """A tqdm bar, or a stand-in that does nothing."""
    if enabled:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, leave=False)

    class _Null:
        def update(self, n: int = 1) -> None: ...

        def set_postfix(self, **kwargs: Any) -> None: ...

        def close(self) -> None: ...

    return _Null()


def train(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Any],
    loss_of_batch: Callable[[int, Any, nn.Module], Tensor],
    *,
    total: int,
    desc: str,
    progress: bool = False,
    grad_clip: float = 0.0,
    scheduler: Any = None,
    steps_per_epoch: int | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Optimise ``net``: one step per batch.

    Args:
        net: the module being trained (in training mode during the loop, in eval mode after it).
        optimizer: its optimiser.
        batches: what each step trains on (``loss_of_batch`` reads it); ``len(batch)`` weights the epoch mean.
            Under torch.distributed each batch must be a tensor of at least as many items as processes.
        loss_of_batch: ``(step, batch, model) -> loss``; it must run the forward pass through ``model`` (``net``,
            or its DistributedDataParallel wrapper), not through ``net`` directly.
        total: number of steps, for the progress bar.
        desc: name of the loop, for the progress bar and errors.
        progress: show a progress bar.
        grad_clip: clip the gradient norm to this (0: no clipping).
        scheduler: stepped after every optimiser step.
        steps_per_epoch: with ``on_epoch``: the number of steps that make one epoch.
        on_epoch: called after each epoch with (epoch, the epoch's mean loss weighted by batch size), the net in
            eval mode (it may score) and gradients off.

    Returns:
        The loss of every step.

    Raises:
        FloatingPointError: a loss became NaN or infinite (the step that produced it is not taken).
    """
    history: list[float] = []
    bar = progress_bar(total, progress and is_main(), desc)
    epoch_sum, epoch_count, epoch = 0.0, 0, 0
    rank, size = world()
    net.train()
    model = net if size == 1 else DistributedDataParallel(net)
    try:
        for step, batch in enumerate(batches):
            if size > 1:
                if len(batch) < size:
                    raise ValueError(f"{desc}: a batch of {len(batch)} cannot be shared by {size} processes")
                batch = batch[rank::size]
            loss = loss_of_batch(step, batch, model)
            value = loss.item() if size == 1 else mean_over_ranks(loss.item())
            if not math.isfinite(value):
                raise FloatingPointError(f"{desc}: the loss became {value} at step {step}; lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            history.append(value)
            bar.update()
            bar.set_postfix(loss=f"{value:.4g}")
            if on_epoch is not None and steps_per_epoch:
                items = (len(batch) if hasattr(batch, "__len__") else 1) * size
                epoch_sum, epoch_count = epoch_sum + value * items, epoch_count + items
                if (step + 1) % steps_per_epoch == 0:
                    net.eval()
                    with torch.no_grad():
                        on_epoch(epoch, epoch_sum / epoch_count)
                    net.train()
                    epoch, epoch_sum, epoch_count = epoch + 1, 0.0, 0
    finally:
        bar.close()
        net.eval()
    return history


def epoch_means(history: list[float], n: int, batch_size: int) -> list[float]:
    """Per-epoch means of the per-step losses of ``epoch_batches(n, batch_size, ...)``, weighted by batch size
    (the last batch of an epoch may be smaller)."""
    sizes = [len(chunk) for chunk in torch.arange(n).split(batch_size)]
    steps = len(sizes)
    return [
        sum(v * b for v, b in zip(history[start : start + steps], sizes)) / n
        for start in range(0, len(history), steps)
    ]


__all__ = ["batch_indices", "epoch_batches", "epoch_means", "progress_bar", "train"]
