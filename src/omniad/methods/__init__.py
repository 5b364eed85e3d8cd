"""Built-in detectors; importing this package registers them."""

import omniad.methods.uniad  # noqa: F401  (registration)
from omniad.align import cada  # noqa: F401  (registration; CADA wraps any registered detector)
from omniad.methods import padim, patchcore, pmad  # noqa: F401  (registration)
from omniad.methods.base import BaseDetector, NotFittedError
from omniad.methods.recontrast import Recontrast
from omniad.methods.revdist import RevDist

__all__ = ["BaseDetector", "NotFittedError", "RevDist", "Recontrast"]
