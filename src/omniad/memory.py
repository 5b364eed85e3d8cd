"""Memory: the budget above which large arrays spill to disk, and the peak resident memory of a fit.

A feature cache of a large training set (UniAD's, a trained method's, PatchCore's paper search over every patch)
can exceed what an inspection PC has. ``allocate`` gives an ordinary tensor while the array fits the budget and a
tensor backed by a memory-mapped temporary file above it: the operating system then keeps in memory what the
training reads and writes the rest to disk. The budget is ``OMNIAD_MEMORY_BUDGET_GB`` (default 2 GiB per array);
the files go to ``OMNIAD_SPILL_DIR`` (default the system's temporary folder) and are deleted when the tensor is.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import tempfile

import numpy as np
import torch
from torch import Tensor

DEFAULT_BUDGET_GB = 2.0


def memory_budget_bytes() -> int:
    """Bytes one array may take in memory before it spills to disk (``OMNIAD_MEMORY_BUDGET_GB``)."""
    raw = os.environ.get("OMNIAD_MEMORY_BUDGET_GB", "")
    try:
        gb = float(raw) if raw else DEFAULT_BUDGET_GB
    except ValueError:
        raise ValueError(f"OMNIAD_MEMORY_BUDGET_GB must be a number of GiB, got {raw!r}") from None
    if not math.isfinite(gb) or gb < 0:
        raise ValueError(f"OMNIAD_MEMORY_BUDGET_GB must be a finite number >= 0, got {raw!r}")
    return int(gb * 2**30)


def allocate(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """An uninitialised tensor of ``shape``: in memory within the budget, memory-mapped on disk above it."""
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    if nbytes <= memory_budget_bytes():
        return torch.empty(shape, dtype=dtype)
    folder = os.environ.get("OMNIAD_SPILL_DIR") or tempfile.gettempdir()
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    handle, path = tempfile.mkstemp(prefix="omniad-spill-", suffix=".bin", dir=folder)
    os.close(handle)
    try:
        array = np.memmap(path, dtype=np_dtype, mode="w+", shape=shape)
    except OSError as error:
        os.unlink(path)
        raise OSError(f"cannot spill a {nbytes / 2**30:.1f} GiB array to {folder}: {error}") from error
    os.unlink(path)  # the mapping keeps the data; the disk space is freed with the tensor
    return torch.from_numpy(array)


class PeakMemory:
    """``with PeakMemory() as peak: ...`` then ``peak.bytes``: the peak resident memory of the process during the
    block. Nested blocks (CADA fitting its base inside its own fit) leave the outer block's peak intact."""

    _depth = 0

    def __enter__(self) -> PeakMemory:
        if PeakMemory._depth == 0:
            reset_peak_rss()
        PeakMemory._depth += 1
        self.bytes = 0
        return self

    def __exit__(self, *exc: object) -> None:
        PeakMemory._depth -= 1
        self.bytes = peak_rss_bytes()


def reset_peak_rss() -> None:
    """Start a new peak of this process's resident memory (Linux: ``/proc/self/clear_refs``); elsewhere a no-op,
    and ``peak_rss_bytes`` then reports the peak since the process started."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    """Peak resident memory of this process since ``reset_peak_rss`` (or its start), in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


__all__ = ["PeakMemory", "allocate", "memory_budget_bytes", "peak_rss_bytes", "reset_peak_rss"]
