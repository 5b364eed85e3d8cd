"""The timm-style registry and the runtime helpers (device choice, seeding)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from omniad import registry
from omniad.methods.base import BaseDetector
from omniad.registry import create_detector, detector_class, list_detectors, register_detector
from omniad.runtime import resolve_device, seed_everything


def test_builtins_are_listed_sorted():
    names = list_detectors()
    assert {"patchcore", "padim"} <= set(names)
    assert names == sorted(names)
    assert detector_class("padim").name == "padim"


def test_create_passes_hyper_parameters():
    det = create_detector("padim", n_features=7, seed=3)
    assert det.n_features == 7 and det.seed == 3 and det.name == "padim"
    with pytest.raises(TypeError):
        create_detector("padim", no_such_param=1)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(KeyError, match="unknown detector 'patchcor'.*padim.*patchcore"):
        create_detector("patchcor")


def test_register_duplicate_names():
    class A(BaseDetector):
        pass

    class B(BaseDetector):
        pass

    try:
        assert register_detector("_dup_test")(A) is A
        assert A.name == "_dup_test" and detector_class("_dup_test") is A
        register_detector("_dup_test")(A)  # the same class again (e.g. a module reload) is fine
        with pytest.raises(ValueError, match="already registered by A"):
            register_detector("_dup_test")(B)
        assert detector_class("_dup_test") is A
    finally:
        registry._REGISTRY.pop("_dup_test", None)
    assert "_dup_test" not in list_detectors()


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda"


def test_seed_everything_repeats_every_generator():
    def draw(gen):
        return random.random(), np.random.rand(), torch.rand(3).tolist(), torch.rand(2, generator=gen).tolist()

    first = draw(seed_everything(5))
    assert draw(seed_everything(5)) == first
    assert draw(seed_everything(6)) != first
    seed_everything(2**40)  # large seeds are folded for numpy instead of failing
