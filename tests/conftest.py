"""Shared fixtures: a tiny synthetic multi-type dataset (written once per session) and the real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from omniad.data.synthetic import make_synthetic_dataset

# The unit tests use tiny tensors: on a small, shared CPU, torch's intra-op threads fight each other and make them
# 10-20x slower (measured: a tiny PaDiM fit 17 s with 2 threads under load, 0.8 s with 1). Override with
# OMNIAD_TEST_THREADS.
torch.set_num_threads(int(os.environ.get("OMNIAD_TEST_THREADS", "1")))

REPO = Path(__file__).resolve().parents[1]
INDUSTRIAL = REPO.parent / "shared" / "data" / "industrial"

# Small enough to write in well under a second; large enough for stride-32 backbones and every defect type.
SYNTHETIC_PARAMS = {
    "categories": ("weave", "granite", "washer"),
    "n_train": 8,
    "n_test_good": 4,
    "n_test_defect": 4,  # one of each defect type: scratch, spot, hole, stain
    "image_size": 64,
    "seed": 0,
}


@pytest.fixture(scope="session")
def synthetic_params() -> dict:
    """The parameters ``synthetic_root`` was written with (a copy: tests may not change the fixture)."""
    return dict(SYNTHETIC_PARAMS)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MVTec-style synthetic set: 3 types x (8 train + 4 good + 4 defective test), 64 px. Read-only."""
    root = tmp_path_factory.mktemp("synthetic")
    params = dict(SYNTHETIC_PARAMS)
    return make_synthetic_dataset(root, categories=list(params.pop("categories")), **params)


TINY_PADIM = dict(weights="random", image_size=64, batch_size=8, device="cpu", progress=False, seed=0)


@pytest.fixture(scope="session")
def padim_bundle(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved PaDiM (random backbone, ``TINY_PADIM``) fitted on ``synthetic_root``'s training images. Read-only."""
    from omniad import create_detector
    from omniad.data import MVTecDataset

    train = MVTecDataset(synthetic_root, split="train", image_size=TINY_PADIM["image_size"])
    path = tmp_path_factory.mktemp("padim-bundle") / "model"
    create_detector("padim", **TINY_PADIM).fit(train).save(path)
    return path


@pytest.fixture(scope="session")
def industrial_root() -> Path:
    """../shared/data/industrial beside the repository (kolektor, magnetic_tile); skipped when absent."""
    if not (INDUSTRIAL / "kolektor").is_dir() or not (INDUSTRIAL / "magnetic_tile").is_dir():
        pytest.skip(f"real industrial data not found at {INDUSTRIAL} (it lives beside the repo in shared/)")
    return INDUSTRIAL
