"""Built-in detectors. Importing this package imports every module in it, and so registers every method that
decorates itself with ``@register_detector`` (``omniad/__init__`` does it once): a new method is one new module
here and nothing else."""

import importlib
import pkgutil

from omniad.methods.base import BaseDetector, NotFittedError

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["BaseDetector", "NotFittedError"]
