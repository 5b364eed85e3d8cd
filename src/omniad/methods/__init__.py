"""Built-in detectors; importing this package registers them."""

from omniad.align import cada  # noqa: F401, E402  (registration; CADA wraps any detector above)
from omniad.methods import padim, patchcore  # noqa: F401  (registration)
from omniad.methods.base import BaseDetector, NotFittedError

__all__ = ["BaseDetector", "NotFittedError"]
