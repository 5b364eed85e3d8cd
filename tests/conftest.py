"""Shared test setup."""

from __future__ import annotations

import os

import torch

# The unit tests use tiny tensors: on a small, shared CPU, torch's intra-op threads fight each other and make them
# 10-20x slower (measured: a tiny PaDiM fit 17 s with 2 threads under load, 0.8 s with 1). Override with
# OMNIAD_TEST_THREADS.
torch.set_num_threads(int(os.environ.get("OMNIAD_TEST_THREADS", "1")))
