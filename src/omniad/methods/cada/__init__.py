"""CADA ("cada"): class-agnostic score alignment over any base detector; the regressor is its network."""

from omniad.methods.cada.detector import CADA
from omniad.methods.cada.network import CADARegressor

__all__ = ["CADA", "CADARegressor"]
