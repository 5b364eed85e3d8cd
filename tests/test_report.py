"""Heatmap overlays (colours, shapes, atomic save) and score histograms (when matplotlib is installed)."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch
from PIL import Image

from omniad.report import jet, overlay_heatmap, save_overlay, score_histograms

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def test_jet_runs_from_blue_to_red():
    low, mid, high = jet(np.array([0.0, 0.5, 1.0]))
    assert low.argmax() == 2 and high.argmax() == 0  # blue at the bottom, red at the top
    assert mid[1] == pytest.approx(1.0) and mid[0] < 1 and mid[2] < 1  # green-ish in the middle
    assert jet(np.zeros((4, 5))).shape == (4, 5, 3)
    np.testing.assert_array_equal(jet(np.array([-3.0, 7.0])), jet(np.array([0.0, 1.0])))  # clipped


def test_overlay_shape_and_colours():
    image = torch.full((3, 8, 12), 0.5)
    amap = torch.zeros(8, 12)
    amap[:, 6:] = 1.0
    out = overlay_heatmap(image, amap, alpha=1.0)
    assert isinstance(out, Image.Image) and out.size == (12, 8) and out.mode == "RGB"
    pixels = np.asarray(out)
    assert pixels[0, 0, 2] > 100 and pixels[0, 0, 0] == 0  # low values blue
    assert pixels[0, 11, 0] > 100 and pixels[0, 11, 2] == 0  # high values red
    plain = np.asarray(overlay_heatmap(image, amap, alpha=0.0))
    assert (plain == 128).all()  # alpha 0: the image itself


def test_overlay_fixed_range_grey_image_and_resized_map():
    grey = np.linspace(0, 1, 16 * 16, dtype=np.float32).reshape(16, 16)
    amap = np.full((4, 4), 2.0, dtype=np.float32)
    out = overlay_heatmap(grey, amap, vmin=0.0, vmax=2.0, alpha=1.0)
    assert out.size == (16, 16)
    assert (np.asarray(out)[..., 0] > 100).all() and (np.asarray(out)[..., 2] == 0).all()  # all at vmax: red
    flat = np.asarray(overlay_heatmap(grey, np.ones((16, 16)), alpha=1.0))
    assert (flat == flat[0, 0]).all()  # a constant map without a range gets one colour, no division by zero
    with pytest.raises(ValueError, match="image"):
        overlay_heatmap(np.zeros((2, 4, 4)), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="alpha"):
        overlay_heatmap(np.zeros((3, 4, 4)), np.zeros((4, 4)), alpha=2.0)


def test_save_overlay_writes_the_image_and_leaves_no_temp_files(tmp_path):
    image, amap = torch.rand(3, 10, 10), torch.rand(10, 10)
    path = save_overlay(image, amap, tmp_path / "sub" / "a.png", vmin=0, vmax=1)
    with Image.open(path) as saved:
        np.testing.assert_array_equal(np.asarray(saved), np.asarray(overlay_heatmap(image, amap, 0, 1)))
    assert os.listdir(path.parent) == ["a.png"]


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib not installed (optional extra omniad[plots])")
def test_score_histograms_writes_a_figure(tmp_path):
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(0, 1, 20), rng.normal(3, 1, 20)])
    labels = np.repeat([0, 1], 20)
    categories = ["a", "b"] * 20
    path = score_histograms(scores, labels, categories, tmp_path / "hist.png", title="t", threshold=1.5)
    with Image.open(path) as figure:
        assert figure.size[0] > 300 and figure.size[1] > 200
    assert os.listdir(tmp_path) == ["hist.png"]
    with pytest.raises(ValueError, match="length"):
        score_histograms(scores, labels[:3], categories, tmp_path / "bad.png")


@pytest.mark.skipif(HAS_MATPLOTLIB, reason="matplotlib is installed")
def test_score_histograms_without_matplotlib_says_what_to_install(tmp_path):
    with pytest.raises(ImportError, match=r"omniad\[plots\]"):
        score_histograms([0.1, 0.9], [0, 1], ["a", "a"], tmp_path / "hist.png")
