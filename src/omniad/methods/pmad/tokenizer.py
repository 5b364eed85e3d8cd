"""Discrete visual tokens from frozen pretrained patch features.

PMAD predicts, for every masked patch, the DALL-E dVAE token of that patch. The dVAE weights are not available
here, so this module is the honest substitute: a codebook learned by seeded k-means on frozen backbone features
of the training patches; a patch's token is the index of its nearest code. Like the dVAE it turns a patch into one
of K discrete symbols that ignore high-frequency pixel detail; unlike it, it is learned on the training images
(normal images only) rather than on 250 M web images.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from omniad.cluster import kmeans, nearest_centres


class Codebook(nn.Module):
    """K code vectors in a standardised feature space, with nearest-code look-up.

    Features are standardised per channel (mean and std of the fitting features) before any distance is taken,
    so that high-magnitude backbone channels do not dominate. Everything lives in buffers, so ``state_dict``
    round-trips the fitted codebook.

    Args:
        size: number of codes K.
        dim: feature dimension D.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("codebook", torch.zeros(size, dim))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @property
    def size(self) -> int:
        """Number of codes K."""
        return int(self.codebook.shape[0])

    @property
    def dim(self) -> int:
        """Feature dimension D."""
        return int(self.codebook.shape[1])

    def fit_standardisation(self, features: Tensor) -> Tensor:
        """Set the per-channel mean/std from (N, D) features and return them standardised."""
        features = _check_features(features, None)
        self.mean = features.mean(0).to(self.codebook.device)
        self.std = features.std(0).clamp_min(1e-6).to(self.codebook.device)
        return self.standardise(features)

    def standardise(self, features: Tensor) -> Tensor:
        """(..., D) raw features -> standardised features."""
        return (features - self.mean.to(features.device)) / self.std.to(features.device)

    def set_codes(self, codes: Tensor) -> None:
        """Replace the codebook by (K', D) codes in the standardised space (K' may differ from K)."""
        if codes.dim() != 2 or codes.shape[1] != self.dim:
            raise ValueError(f"codes must be (K, {self.dim}), got {tuple(codes.shape)}")
        self.codebook = codes.detach().to(self.codebook.device, torch.float32).clone()

    def nearest(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """Distance to and index of the nearest code for (..., D) raw features -> two (...,) tensors."""
        features = _check_features(features, self.dim, flatten=False)
        flat = self.standardise(features.reshape(-1, self.dim).float())
        dist, idx = nearest_centres(flat, self.codebook.to(flat.device))
        shape = features.shape[:-1]
        return dist.view(shape), idx.view(shape)


class VisualTokenizer(Codebook):
    """Reusable visual tokenizer: k-means codebook on frozen patch features; token = nearest code.

    The substitute for PMAD's DALL-E dVAE (not available here). Deterministic from ``seed`` on the CPU; save and
    restore through ``state_dict`` / ``load_state_dict`` (buffers ``codebook``, ``mean``, ``std``).

    Args:
        num_tokens: vocabulary size K (the dVAE has 8192).
        dim: dimension of the patch features it tokenises.

    Example:
        >>> tok = VisualTokenizer(256, feats.shape[1]).fit(feats, seed=0)   # feats: (N, D) training patches
        >>> tokens = tok.encode(test_feats)                                # (..., D) -> (...,) long
    """

    def __init__(self, num_tokens: int, dim: int) -> None:
        super().__init__(num_tokens, dim)

    @property
    def num_tokens(self) -> int:
        """Vocabulary size."""
        return self.size

    @torch.no_grad()
    def fit(
        self, features: Tensor, seed: int = 0, max_samples: int | None = 100_000, iterations: int = 30
    ) -> VisualTokenizer:
        """Learn the codebook by k-means on (N, D) patch features of normal training images.

        Args:
            features: (N, D) frozen patch features.
            seed: seeds the subsample and the k-means++ draw.
            max_samples: k-means runs on a seeded random subsample of at most this many rows (None: all).
            iterations: Lloyd iterations.

        Returns:
            self. When N < K the vocabulary shrinks to N codes (``num_tokens`` reports the size used).
        """
        features = _check_features(features, self.dim)
        standardised = self.fit_standardisation(features.float())
        sample = _subsample(standardised, max_samples, seed)
        self.set_codes(kmeans(sample, self.size, iterations=iterations, seed=seed))
        return self

    def encode(self, features: Tensor) -> Tensor:
        """(..., D) patch features -> (...,) long token ids."""
        return self.nearest(features)[1]

    def forward(self, features: Tensor) -> Tensor:
        """Same as ``encode``."""
        return self.encode(features)


def _subsample(points: Tensor, max_samples: int | None, seed: int) -> Tensor:
    if max_samples is None or points.shape[0] <= max_samples:
        return points
    index = torch.randperm(points.shape[0], generator=torch.Generator().manual_seed(seed))[:max_samples]
    return points[index.to(points.device)]


def _check_features(features: Tensor, dim: int | None, flatten: bool = True) -> Tensor:
    if not isinstance(features, Tensor) or not features.is_floating_point():
        raise TypeError("features must be a float tensor")
    if flatten and features.dim() != 2:
        raise ValueError(f"features must be (N, D), got {tuple(features.shape)}")
    if dim is not None and features.shape[-1] != dim:
        raise ValueError(f"features have dimension {features.shape[-1]}, the codebook expects {dim}")
    if features.numel() == 0:
        raise ValueError("no features given")
    return features


__all__ = ["Codebook", "VisualTokenizer"]
