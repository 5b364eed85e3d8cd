"""Map post-processing: Gaussian smoothing against scipy, image-score pooling on hand cases, resizing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from omniad.postprocess import gaussian_blur, image_score, max_pooled, top_fraction_mean, upsample


@pytest.mark.parametrize("shape", [(3, 40, 37), (2, 64, 64), (1, 9, 12), (1, 2, 3)])
def test_gaussian_blur_matches_scipy_default(shape):
    """sigma 4 as the protocol says, scipy's defaults (mode "reflect", truncate 4), even for maps below the kernel."""
    maps = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    ours = gaussian_blur(maps, 4.0).numpy()
    ref = np.stack([ndimage.gaussian_filter(m, 4.0) for m in maps.double().numpy()])
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_gaussian_blur_other_sigma_and_mass_preserved():
    maps = torch.rand(2, 30, 30, generator=torch.Generator().manual_seed(1))
    ref = np.stack([ndimage.gaussian_filter(m, 1.5) for m in maps.double().numpy()])
    np.testing.assert_allclose(gaussian_blur(maps, 1.5).numpy(), ref, atol=1e-5)
    constant = torch.full((1, 20, 20), 3.0)
    torch.testing.assert_close(gaussian_blur(constant, 4.0), constant)


@pytest.mark.parametrize("sigma", [0, 0.0, -1.0])
def test_gaussian_blur_sigma_zero_is_identity(sigma):
    maps = torch.rand(2, 8, 8)
    assert torch.equal(gaussian_blur(maps, sigma), maps)


def test_top_fraction_mean_hand_cases():
    maps = torch.arange(200, dtype=torch.float32).view(2, 10, 10)  # values 0..99 and 100..199
    # k = ceil(0.01 * 100) = 1: the maximum
    assert top_fraction_mean(maps, 0.01).tolist() == [99.0, 199.0]
    # k = ceil(0.05 * 100) = 5: mean of 95..99
    assert top_fraction_mean(maps, 0.05).tolist() == [97.0, 197.0]
    # k = ceil(0.021 * 100) = 3 (rounded up, not down)
    assert top_fraction_mean(maps, 0.021).tolist() == [98.0, 198.0]
    # tiny fraction still uses one value; fraction 1 is the plain mean
    assert top_fraction_mean(maps, 1e-9).tolist() == [99.0, 199.0]
    torch.testing.assert_close(top_fraction_mean(maps, 1.0), maps.flatten(1).mean(1))


def test_top_fraction_mean_k_is_exact_ceiling():
    """k = ceil(fraction * N) with no float drift (e.g. 0.07 * 100 must be 7, not 8)."""
    for n in (100, 300, 700, 1000):
        for fraction in (0.01, 0.03, 0.07, 0.1):
            maps = torch.arange(n, dtype=torch.float64).view(1, n)
            k = -(-round(fraction * 1000) * n // 1000)  # exact integer ceiling
            expected = float(np.arange(n - k, n).mean())
            assert top_fraction_mean(maps, fraction).item() == pytest.approx(expected), (n, fraction)


def test_max_pooled_hand_case():
    maps = torch.zeros(1, 4, 4)
    maps[0, 0, 0] = 8.0
    maps[0, 3, 3] = 4.0
    maps[0, 3, 2] = 4.0
    maps[0, 2, 3] = 4.0
    # 2x2 windows: the lone spike averages 8 / 4 = 2, the bottom-right window (4 + 4 + 4 + 0) / 4 = 3
    assert max_pooled(maps, kernel=2).item() == pytest.approx(3.0)
    # kernel larger than the map -> one window over the whole map
    assert max_pooled(maps, kernel=16).item() == pytest.approx(maps.mean().item())
    assert max_pooled(maps, kernel=1).item() == 8.0


def test_image_score_poolings():
    maps = torch.rand(3, 16, 16)
    torch.testing.assert_close(image_score(maps, "max"), maps.flatten(1).max(1).values)
    torch.testing.assert_close(image_score(maps, "top1"), top_fraction_mean(maps, 0.01))
    torch.testing.assert_close(image_score(maps, "maxpool", kernel=4), max_pooled(maps, 4))
    assert image_score(maps).shape == (3,)


def test_image_score_rejects_unknown_pooling():
    with pytest.raises(ValueError, match="unknown image-score pooling 'median'"):
        image_score(torch.rand(1, 4, 4), "median")


def test_upsample_shapes_and_values():
    small = torch.rand(2, 4, 5)
    assert upsample(small, (32, 40)).shape == (2, 32, 40)
    assert upsample(small.unsqueeze(1), (8, 10)).shape == (2, 8, 10)
    # same size: unchanged
    assert torch.equal(upsample(small, (4, 5)), small)
    # bilinear up-sampling of a constant stays constant and keeps the range
    big = upsample(torch.rand(1, 3, 3), (30, 30))
    assert math.isfinite(big.sum().item())
    torch.testing.assert_close(upsample(torch.full((1, 2, 2), 5.0), (7, 9)), torch.full((1, 7, 9), 5.0))


@pytest.mark.parametrize(("raw", "size", "crop", "sigma"), [
    ((32, 32), (256, 256), None, 4.0),  # the protocol's PatchCore tail
    ((8, 12), (64, 100), (50, 70), 2.0),  # non-square, cropped
    ((7, 7), (7, 7), None, 0.0),  # nothing to do
    ((40, 30), (20, 45), None, 4.0),  # down-sampled on one axis, the kernel wider than the map
])
def test_score_tail_as_matrices_equals_upsample_crop_blur(raw, size, crop, sigma):
    from omniad.postprocess import to_scores

    maps = torch.rand(3, *raw, generator=torch.Generator().manual_seed(0)) * 10
    expected = upsample(maps, size)
    if crop is not None:
        expected = expected[:, : crop[0], : crop[1]]
    expected = gaussian_blur(expected, sigma)
    scores, got = to_scores(maps, size, sigma, "max", crop=crop)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    torch.testing.assert_close(scores, expected.flatten(1).max(1).values, rtol=1e-5, atol=1e-5 * 10)
    _, with_channel = to_scores(maps[:, None], size, sigma, "max", crop=crop)  # (B, 1, h, w) as upsample takes
    torch.testing.assert_close(with_channel, got)
