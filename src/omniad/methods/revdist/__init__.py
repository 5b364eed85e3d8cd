"""Reverse Distillation ("revdist"): frozen encoder, trainable one-class bottleneck and reverse decoder."""

from omniad.methods.revdist.detector import RevDist
from omniad.methods.revdist.network import RevDistNet

__all__ = ["RevDist", "RevDistNet"]
