"""Reverse Distillation: network shapes, cosine loss and map on hand cases, presets, fitting, save/load."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from omniad import create_detector, load_detector
from omniad.methods.distillation import preset_depths
from omniad.methods.revdist.network import (
    OneClassBottleneck,
    RevDistNet,
    ReverseDecoder,
    anomaly_map,
    cosine_distance_maps,
    revdist_loss,
)
from omniad.postprocess import gaussian_blur

LITE0 = ([24, 40, 112], [4, 8, 16])
TINY = dict(preset="cpu", iterations=6, weights="random", image_size=32, batch_size=8, device="cpu", progress=False)


def _maps(channels, strides, size=64, batch=2):
    return [torch.randn(batch, c, size // s, size // s) for c, s in zip(channels, strides, strict=True)]


@pytest.mark.parametrize(
    "channels, strides, blocks",
    [(*LITE0, (1, 1, 1)), ([8, 16, 32], [4, 8, 16], (2, 1, 1)), ([8, 16, 16, 32], [2, 4, 8, 32], (1, 1, 1, 1))],
)
def test_decoder_outputs_match_encoder_stages(channels, strides, blocks):
    net = RevDistNet(channels, strides, bottleneck_blocks=1, decoder_blocks=blocks).eval()
    features = _maps(channels, strides)
    with torch.no_grad():
        out = net(features)
    assert [o.shape for o in out] == [f.shape for f in features]
    assert net.bottleneck.stride == 2 * strides[-1]
    assert net.bottleneck.embed_channels == 2 * channels[-1]  # default: like the next encoder stage


def test_bottleneck_fuses_to_last_stride_and_embeds_at_twice_it():
    ocbe = OneClassBottleneck(*LITE0, embed_channels=50, blocks=2).eval()
    with torch.no_grad():
        fused = [f(x) for f, x in zip(ocbe.fuse, _maps(*LITE0)[:-1], strict=True)]
        out = ocbe(_maps(*LITE0))
    assert all(f.shape[1:] == (112, 4, 4) for f in fused)
    assert out.shape == (2, 50, 2, 2)


def test_bad_stage_layouts_are_clear_errors():
    with pytest.raises(ValueError, match="one count per encoder stage"):
        ReverseDecoder(*LITE0, in_channels=8, in_stride=32, blocks=(1, 1))
    with pytest.raises(ValueError, match="power of two"):
        OneClassBottleneck([8, 16], [4, 12])


def test_cosine_loss_is_zero_for_identical_maps_and_positive_otherwise():
    maps = _maps(*LITE0)
    assert revdist_loss(maps, [m.clone() for m in maps]).item() == pytest.approx(0.0, abs=1e-6)
    # hand case: stage 1 identical (distance 0), stage 2 orthogonal (1), stage 3 opposite (2) -> mean = 1
    e = [torch.zeros(1, 2, 3, 3) for _ in range(3)]
    for m in e:
        m[:, 0] = 1.0
    d = [e[0].clone(), torch.stack([torch.zeros(1, 3, 3), torch.ones(1, 3, 3)], dim=1), -e[2]]
    assert revdist_loss(e, d).item() == pytest.approx(1.0, abs=1e-6)
    assert revdist_loss(maps, [m + torch.randn_like(m) for m in maps]).item() > 0


def test_loss_gradient_reaches_the_decoder_only():
    encoder = [torch.randn(1, 4, 2, 2, requires_grad=True)]
    decoder = [torch.randn(1, 4, 2, 2, requires_grad=True)]
    revdist_loss(encoder, decoder).backward()
    assert encoder[0].grad is None and decoder[0].grad.abs().sum() > 0


def test_anomaly_map_is_the_sum_of_upsampled_distances():
    # stage 1 (4x4): distance 1 at one location (orthogonal vector), 0 elsewhere; stage 2 (2x2): opposite -> 2
    e1 = torch.zeros(1, 2, 4, 4)
    e1[:, 0] = 1
    d1 = e1.clone()
    d1[0, :, 1, 2] = torch.tensor([0.0, 1.0])
    e2 = torch.zeros(1, 2, 2, 2)
    e2[:, 1] = 1
    amap = anomaly_map([e1, e2], [d1, -e2], size=(8, 8))
    hot = torch.zeros(1, 1, 4, 4)
    hot[0, 0, 1, 2] = 1
    expected = F.interpolate(hot, size=(8, 8), mode="bilinear", align_corners=False)[:, 0] + 2
    assert amap.shape == (1, 8, 8)
    torch.testing.assert_close(amap, expected)
    assert cosine_distance_maps([e1], [d1])[0][0, 1, 2] == pytest.approx(1.0)
    blurred = gaussian_blur(amap, 4)
    assert blurred.max() < amap.max() and blurred.mean() == pytest.approx(amap.mean().item(), rel=0.05)


def test_presets_fill_only_what_is_left_unset():
    paper = create_detector("revdist")
    assert paper.iterations is None  # __init__ stores what it is given; the preset resolves at fit
    r = paper.resolved_params()
    assert (r["iterations"], r["train_batch_size"], r["decoder_blocks"]) == (5000, 16, (6, 4, 3))
    assert (r["lr"], r["betas"], r["weight_decay"], r["decoder_activation"]) == (2e-3, (0.9, 0.999), 1e-5, "gelu")
    cpu = create_detector("revdist", preset="cpu", iterations=7).resolved_params()
    assert cpu["iterations"] == 7 and cpu["decoder_blocks"] == (1, 1, 1) and cpu["train_batch_size"] < 16
    assert create_detector("revdist", stages=(1, 2)).resolved_params()["decoder_blocks"] == (4, 3)
    assert create_detector("revdist", decoder_blocks=(2, 2, 2)).resolved_params()["decoder_blocks"] == (2, 2, 2)
    assert preset_depths((6, 4, 3), 4) == (6, 6, 4, 3)
    with pytest.raises(ValueError, match="unknown preset"):
        create_detector("revdist", preset="fast").resolved_params()
    with pytest.raises(ValueError, match="iterations must be in"):
        create_detector("revdist", iterations=0).fit(torch.rand(2, 3, 32, 32))




@pytest.fixture(scope="module")
def images():
    return torch.rand(10, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_fit_reduces_the_loss_and_saves_identically(images, tmp_path):
    detector = create_detector("revdist", **TINY).fit(images)
    history = detector.loss_history_
    assert len(history) == 6 and history[-1] < history[0]
    scores = detector.score(images[:4])
    assert scores.anomaly_maps.shape == (4, 32, 32) and (scores.anomaly_maps >= 0).all()
    assert detector.backbone_.channels == [24, 40, 112]  # the Backbone is reachable for wrappers (CADA)
    detector.save(tmp_path / "rd")
    again = load_detector(tmp_path / "rd").score(images[:4])
    torch.testing.assert_close(again.image_scores, scores.image_scores)
    torch.testing.assert_close(again.anomaly_maps, scores.anomaly_maps)


def test_max_pooling_is_selectable(images):
    detector = create_detector("revdist", **{**TINY, "iterations": 1, "image_pooling": "max"}).fit(images)
    result = detector.score(images[:2])
    torch.testing.assert_close(result.image_scores, result.anomaly_maps.flatten(1).max(dim=1).values)
