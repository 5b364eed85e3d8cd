"""Device choice, seeding and the export flag, in one place so nothing hard-codes them."""

from __future__ import annotations

import random

import numpy as np
import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA when present, else the CPU; anything else is passed to ``torch.device``."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU generator seeded the same way for explicit use."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def is_exporting() -> bool:
    """Whether the code runs inside ``torch.onnx.export``'s trace (``omniad.export``). Sizes are fixed there and
    loops unrolled, so the few helpers that chunk or pool by a size take an equivalent traceable path; eager scores
    never take it."""
    return torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()
