"""PMAD (AAAI 2023): proposal-masked visual-token prediction for cross-class anomaly detection."""

from omniad.methods.pmad.detector import PMAD
from omniad.methods.pmad.network import PMADNet
from omniad.methods.pmad.tokenizer import Codebook, VisualTokenizer

__all__ = ["PMAD", "PMADNet", "Codebook", "VisualTokenizer"]
