"""PaDiM: the accumulated Gaussians against numpy, seeded channel choice, the Mahalanobis map on a hand case."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from omniad import create_detector
from omniad.methods.padim import PaDiMNet

SIZE = 32
COMMON = dict(weights="random", image_size=SIZE, device="cpu", progress=False, calibration_fraction=0.0,
              stages=(1, 2), n_features=10)


@pytest.fixture(scope="module")
def images():
    return torch.rand(9, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def fitted(images):
    # batch_size 4 < 9 images: the statistics are accumulated over several batches, the last one partial
    return create_detector("padim", batch_size=4, epsilon=0.01, **COMMON).fit(images)


def test_gaussians_equal_numpy_mean_and_inverse_regularised_covariance(fitted, images):
    net = fitted.net_
    with torch.no_grad():
        emb = net.embed(images).double().numpy()  # (N, positions, d)
    n, positions, d = emb.shape
    assert d == 10 and positions == net.grid[0] * net.grid[1]
    np.testing.assert_allclose(net.mean.numpy(), emb.mean(axis=0), rtol=1e-5, atol=1e-5)
    for p in range(positions):
        cov = np.cov(emb[:, p, :], rowvar=False) + 0.01 * np.eye(d)
        expected = np.linalg.inv(cov)
        got = net.precision[p].double().numpy()
        np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())


def test_channel_selection_is_seeded(fitted, images):
    index = fitted.net_.channel_index
    total = sum(fitted.backbone_.channels)
    assert index.numel() == 10 and len(set(index.tolist())) == 10
    assert torch.equal(index, index.sort().values) and 0 <= index.min() and index.max() < total
    same = create_detector("padim", seed=0, **COMMON).fit(images[:2]).net_.channel_index
    other = create_detector("padim", seed=1, **COMMON).fit(images[:2]).net_.channel_index
    assert torch.equal(same, index)
    assert not torch.equal(other, index)
    # n_features above the backbone's channels keeps them all
    every = create_detector("padim", **{**COMMON, "n_features": 10_000}).fit(images[:2]).net_.channel_index
    assert every.tolist() == list(range(total))


class _Identity(nn.Module):
    """A 'backbone' whose single stage is the image itself (3 channels at full resolution)."""

    def forward(self, images):
        return [images]


def test_mahalanobis_map_hand_case():
    net = PaDiMNet(_Identity(), torch.tensor([0, 2]), grid=(1, 2))
    net.mean.copy_(torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    net.precision.copy_(torch.stack([torch.diag(torch.tensor([4.0, 1.0])), torch.tensor([[2.0, 1.0], [1.0, 2.0]])]))
    image = torch.zeros(1, 3, 1, 2)
    image[0, :, 0, 0] = torch.tensor([2.0, 99.0, 3.0])  # diff (1, 2): 4*1 + 1*4 = 8; channel 1 is not selected
    image[0, :, 0, 1] = torch.tensor([1.0, -5.0, -1.0])  # diff (1, -1): 2 - 2 + 2 = 2
    out = net(image)
    assert out.shape == (1, 1, 2)
    torch.testing.assert_close(out[0, 0], torch.tensor([8.0, 2.0]).sqrt())
    # at the mean the distance is exactly zero
    at_mean = torch.tensor([[[[1.0, 0.0]], [[7.0, 7.0]], [[1.0, 0.0]]]])
    assert net(at_mean).abs().max() == 0


def test_scores_defect_above_normals_and_resizes_other_sizes(images):
    g = torch.Generator().manual_seed(3)
    normals = (0.5 + 0.02 * torch.rand(10, 3, SIZE, SIZE, generator=g)).clamp(0, 1)
    det = create_detector("padim", batch_size=4, **COMMON).fit(normals[:8])
    defect = normals[8:].clone()
    defect[:, :, 10:20, 10:20] = 1.0
    good, bad = det.score(normals[8:]), det.score(defect)
    assert bad.image_scores.min() > good.image_scores.max()
    assert bad.anomaly_maps.shape == (2, SIZE, SIZE)
    big = torch.nn.functional.interpolate(defect, scale_factor=2, mode="nearest")
    resized = det.score(big)  # resized to the model's size (bilinear, antialiased), as every method does
    assert resized.anomaly_maps.shape == (2, SIZE, SIZE) and resized.image_scores.min() > good.image_scores.max()


def test_stage_wise_channel_selection_equals_selecting_from_the_fused_stages(fitted, images):
    from omniad.features import fuse_stages

    net = fitted.net_
    with torch.no_grad():
        expected = fuse_stages(net.backbone(images)).index_select(1, net.channel_index).flatten(2).transpose(1, 2)
        torch.testing.assert_close(net.embed(images), expected, rtol=1e-5, atol=1e-5)
        total = sum(fitted.backbone_.channels)
        # the first stage contributes nothing: the grid is still the first stage's
        late = PaDiMNet(net.backbone, torch.arange(total - 4, total), net.grid)
        assert late.embed(images).shape == (len(images), net.grid[0] * net.grid[1], 4)
        unsorted = PaDiMNet(net.backbone, net.channel_index.flip(0), net.grid)  # kept in its own order
        torch.testing.assert_close(unsorted.embed(images), expected.flip(-1), rtol=1e-5, atol=1e-5)
