"""ReContrast ("recontrast"): contrastive reconstruction across a frozen and a trainable encoder."""

from omniad.methods.recontrast.detector import Recontrast
from omniad.methods.recontrast.network import RecontrastNet

__all__ = ["Recontrast", "RecontrastNet"]
