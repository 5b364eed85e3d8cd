"""Built-in detectors: importing this package registers them (``omniad/__init__`` does, once)."""

from omniad.methods import cada, padim, patchcore, pmad, recontrast, revdist, uniad  # noqa: F401  (registration)
from omniad.methods.base import BaseDetector, NotFittedError

__all__ = ["BaseDetector", "NotFittedError"]
