"""Masked knowledge distillation with DEFEND (ACCV 2024): semantic and multi-object novelty."""

from omniad.methods.mkd.defend import DefendNet, sinkhorn_knopp
from omniad.methods.mkd.detector import MKD
from omniad.methods.mkd.network import MaskedStudent, discrepancy

__all__ = ["MKD", "DefendNet", "MaskedStudent", "discrepancy", "sinkhorn_knopp"]
