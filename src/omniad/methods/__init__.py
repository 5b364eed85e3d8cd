"""Built-in detectors; importing this package registers them."""

from omniad.methods.base import BaseDetector, NotFittedError

__all__ = ["BaseDetector", "NotFittedError"]
