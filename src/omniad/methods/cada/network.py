"""The CADA regressor (and class-aware B's classifier): frozen encoder features -> (u, gamma) or class logits.

Paper (Sec. 3.3, 4.2, Table 3): one convolution with as many output channels as input channels, then two linear
layers with hidden dimension 256, dropout 0.25 before the linear layers. The paper does not state the kernel size,
the activation or how the convolved map becomes a vector; we use a 3x3 convolution, ReLU and global average
pooling (the usual choice for such heads).

Two additions, both invertible bookkeeping that does not change what is learned: the input features are
standardised per channel with statistics of the training cache, and the outputs are de-standardised with the
training targets' mean and standard deviation (``target_mean``/``target_scale``). Base detectors' anomaly scores
differ by orders of magnitude (cosine distances ~0.1, PaDiM Mahalanobis distances ~10-100); with standardised
targets the paper's SGD setting (lr 5e-2, momentum 0.9) trains at the same pace for all of them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class CADARegressor(nn.Module):
    """Feature map -> ``n_outputs`` numbers (CADA: (u, gamma); class-aware B: class logits).

    Args:
        in_channels: channels of the frozen feature map it reads.
        n_outputs: 2 for the (u, gamma) regressor, the number of classes for a classifier.
        hidden: hidden width of the linear layers (paper: 256).
        dropout: dropout rate before each linear layer (paper: 0.25).
        kernel_size: kernel of the convolution.
    """

    def __init__(
        self, in_channels: int, n_outputs: int = 2, hidden: int = 256, dropout: float = 0.25, kernel_size: int = 3
    ) -> None:
        super().__init__()
        if in_channels < 1 or n_outputs < 1:
            raise ValueError(f"CADARegressor needs positive sizes: in_channels={in_channels}, n_outputs={n_outputs}")
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size, padding=kernel_size // 2)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(in_channels, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, n_outputs),
        )
        self.register_buffer("feature_mean", torch.zeros(in_channels))
        self.register_buffer("feature_scale", torch.ones(in_channels))
        self.register_buffer("target_mean", torch.zeros(n_outputs))
        self.register_buffer("target_scale", torch.ones(n_outputs))

    def set_normalisation(
        self, feature_mean: Tensor, feature_scale: Tensor, target_mean: Tensor | None, target_scale: Tensor | None
    ) -> None:
        """Store the standardisation of inputs (and, for a regressor, of targets) computed on the training set."""
        self.feature_mean.copy_(feature_mean)
        self.feature_scale.copy_(feature_scale)
        if target_mean is not None:
            self.target_mean.copy_(target_mean)
        if target_scale is not None:
            self.target_scale.copy_(target_scale)

    def forward_normalised(self, features: Tensor) -> Tensor:
        """(B, C, h, w) raw features -> (B, n_outputs) outputs in standardised target units (what the loss sees)."""
        x = (features - self.feature_mean.view(1, -1, 1, 1)) / self.feature_scale.view(1, -1, 1, 1)
        x = self.pool(self.act(self.conv(x))).flatten(1)
        return self.head(x)

    def forward(self, features: Tensor, normalised: bool = False) -> Tensor:
        """(B, C, h, w) raw features -> (B, n_outputs) in the targets' own units (``normalised``: in standardised
        target units, what the loss sees; a keyword so that training runs through ``forward``, as
        DistributedDataParallel needs)."""
        out = self.forward_normalised(features)
        return out if normalised else out * self.target_scale + self.target_mean


def channel_statistics(features: Tensor, floor: float = 0.1) -> tuple[Tensor, Tensor]:
    """Per-channel mean and standard deviation of an (N, C, h, w) feature cache.

    Each channel's std is floored at ``floor`` x the median channel std: a channel that is (nearly) constant on
    the training images (a dead ReLU, a few training images) would otherwise multiply its test-time values by a
    huge factor and throw the regressor far outside what it was trained on.
    """
    x = features.transpose(0, 1).flatten(1).double()
    std = x.std(1, unbiased=False)
    lowest = max(float(floor * std.median()), 1e-6)
    return x.mean(1).float(), std.clamp_min(lowest).float()


__all__ = ["CADARegressor", "channel_statistics"]
