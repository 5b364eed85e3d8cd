"""The feature cache: one backbone pass per image, batch order kept, transforms and dtype applied."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from omniad.features import extract_features, fuse_stages


class _CountingBackbone(nn.Module):
    """Two 'stages': the image mean over channels at full and half resolution; counts images seen."""

    def __init__(self):
        super().__init__()
        self.seen = 0

    def forward(self, images):
        self.seen += images.shape[0]
        full = images.mean(1, keepdim=True)
        return [full, nn.functional.avg_pool2d(full, 2)]


def test_extract_features_runs_once_per_image_in_order():
    images = torch.rand(7, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    backbone = _CountingBackbone()
    full, half = extract_features(backbone, images, torch.device("cpu"), batch_size=3)
    assert backbone.seen == 7
    assert full.shape == (7, 1, 8, 8) and half.shape == (7, 1, 4, 4)
    torch.testing.assert_close(full, images.mean(1, keepdim=True))


def test_extract_features_transform_and_dtype():
    images = torch.rand(5, 3, 8, 8)
    (fused,) = extract_features(
        _CountingBackbone(), list(images), torch.device("cpu"), batch_size=2,
        transform=lambda feats: fuse_stages(feats), dtype=torch.float16,
    )
    assert fused.shape == (5, 2, 8, 8) and fused.dtype == torch.float16 and fused.device.type == "cpu"
    pair = extract_features(_CountingBackbone(), images, torch.device("cpu"), transform=lambda f: (f[1], f[1] * 2))
    torch.testing.assert_close(pair[1], 2 * pair[0])


def test_extract_features_rejects_empty_data():
    with pytest.raises(ValueError, match="no images"):
        extract_features(_CountingBackbone(), [], torch.device("cpu"))


def test_fuse_stages_resizes_to_first_stage_and_concatenates():
    a, b, c = torch.rand(2, 4, 8, 8), torch.rand(2, 5, 4, 4), torch.rand(2, 6, 2, 2)
    out = fuse_stages([a, b, c])
    assert out.shape == (2, 15, 8, 8)
    assert torch.equal(out[:, :4], a)  # the first stage is untouched
    # a constant coarse map stays constant after bilinear up-sampling
    const = fuse_stages([a, torch.full((2, 1, 2, 2), 3.0)])
    torch.testing.assert_close(const[:, 4], torch.full((2, 8, 8), 3.0))
    # explicit size with area pooling: averaging a fine map onto a coarse grid
    pooled = fuse_stages([a, b], size=(4, 4), mode="area")
    assert pooled.shape == (2, 9, 4, 4)
    torch.testing.assert_close(pooled[:, :4], nn.functional.avg_pool2d(a, 2))
    assert torch.equal(pooled[:, 4:], b)
