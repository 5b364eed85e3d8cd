"""A timm-style registry: ``@register_detector("name")``, ``create_detector``, ``list_detectors``.

A leaf: it imports nothing of omniad. The built-in methods register themselves when ``omniad`` is imported (its
``__init__`` imports ``omniad.methods``), which every ``import omniad.<anything>`` does first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

_REGISTRY: dict[str, type] = {}

T = TypeVar("T", bound=type)


def register_detector(name: str) -> Callable[[T], T]:
    """Class decorator that makes a detector creatable by ``name``."""

    def decorate(cls: T) -> T:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"detector name {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def list_detectors() -> list[str]:
    """Names of every registered detector, sorted."""
    return sorted(_REGISTRY)


def detector_class(name: str) -> type:
    """The class registered under ``name``; the error lists the known names."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown detector {name!r}; known detectors: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def create_detector(name: str, **params: Any):
    """Create an unfitted detector by registered name with the given hyper-parameters."""
    return detector_class(name)(**params)
