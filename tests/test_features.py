"""Stage fusion and the feature containers the base caches (a tensor or a list of tensors)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from omniad.features import feature_cat, feature_count, feature_slice, feature_to, fuse_stages


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


@pytest.mark.parametrize("as_list", [False, True])
def test_feature_containers_slice_move_and_join_alike(as_list):
    a, b = torch.rand(5, 2, 4, 4), torch.rand(5, 3, 2, 2)
    features = [a, b] if as_list else a
    assert feature_count(features) == 5
    parts = [feature_slice(features, 0, 2), feature_slice(features, 2, 5)]
    joined = feature_cat(parts)
    for got, want in zip(joined if as_list else [joined], features if as_list else [features]):
        assert torch.equal(got, want)
    half = feature_to(features, "cpu", torch.float16)
    assert (half[0] if as_list else half).dtype == torch.float16
