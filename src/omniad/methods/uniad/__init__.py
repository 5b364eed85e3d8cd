"""UniAD: unified multi-class anomaly detection by feature reconstruction (You et al., NeurIPS 2022)."""

from omniad.methods.uniad.detector import PRESETS, UniAD
from omniad.methods.uniad.network import UniADNet, feature_jitter, neighbor_attention_mask, neighbor_blocked

__all__ = ["PRESETS", "UniAD", "UniADNet", "feature_jitter", "neighbor_attention_mask", "neighbor_blocked"]
