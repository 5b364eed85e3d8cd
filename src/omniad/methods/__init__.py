"""Built-in detectors; importing this package registers them."""

from omniad.methods import padim, patchcore, pmad  # noqa: F401  (registration)
from omniad.methods.base import BaseDetector, NotFittedError

__all__ = ["BaseDetector", "NotFittedError"]
