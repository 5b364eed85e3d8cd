"""Ranking metrics vs scikit-learn, AU-PRO vs a slow per-threshold reference, hand and degenerate cases."""

from __future__ import annotations

import math
from bisect import bisect

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from omniad.metrics import aupro, auroc, average_precision, f1_max, pixel_metrics, ranking_metrics


def _sklearn_f1_max(labels, scores) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    denom = precision + recall
    return float(np.max(np.where(denom > 0, 2 * precision * recall / np.where(denom > 0, denom, 1), 0)))


def _random_case(rng: np.random.Generator):
    n = int(rng.integers(2, 400))
    labels = rng.random(n) < rng.uniform(0.05, 0.95)
    labels[0], labels[1] = True, False  # both classes present
    if rng.random() < 0.5:  # heavy ties: few distinct values, shared across the classes
        scores = rng.integers(0, int(rng.integers(1, 12)), n).astype(np.float32)
    else:
        scores = (rng.normal(size=n) + labels * rng.uniform(0, 2)).astype(np.float32)
    return labels, scores


def test_ranking_metrics_equal_sklearn_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(80):
        labels, scores = _random_case(rng)
        assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
        assert average_precision(labels, scores) == pytest.approx(
            average_precision_score(labels, scores), abs=1e-12
        )
        assert f1_max(labels, scores) == pytest.approx(_sklearn_f1_max(labels, scores), abs=1e-12)


def test_ranking_metrics_accept_torch_and_any_shape_and_leave_input_alone():
    rng = np.random.default_rng(1)
    labels, scores = _random_case(rng)
    labels, scores = labels[:120], scores[:120]
    labels[:2] = [True, False]
    before = scores.copy()
    expected = ranking_metrics(labels, scores)
    got = ranking_metrics(
        torch.from_numpy(labels.astype(np.int64)).view(12, -1), torch.from_numpy(scores).view(12, -1)
    )
    assert got == pytest.approx(expected)
    np.testing.assert_array_equal(scores, before)


def test_hand_cases():
    y = [0, 0, 1, 1]
    assert auroc(y, [0.1, 0.2, 0.8, 0.9]) == 1.0 and auroc(y, [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert auroc(y, [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert average_precision(y, [0.1, 0.2, 0.8, 0.9]) == 1.0 and f1_max(y, [0.1, 0.2, 0.8, 0.9]) == 1.0
    # all tied: precision 1/2 at full recall -> AP 0.5; best F1 = 2 * 0.5 * 1 / 1.5
    assert average_precision(y, [1, 1, 1, 1]) == 0.5
    assert f1_max(y, [1, 1, 1, 1]) == pytest.approx(2 / 3)
    # one defect ranked first, one last: AP = (1 + 2/4) / 2
    assert average_precision(y, [0.5, 0.6, 0.9, 0.1]) == pytest.approx(0.75)


def test_degenerate_input_is_nan_and_bad_input_raises():
    for fn in (auroc, average_precision, f1_max):
        assert math.isnan(fn([0, 0, 0], [0.1, 0.2, 0.3]))
        assert math.isnan(fn([1, 1], [0.1, 0.2]))
        assert math.isnan(fn([], []))
    with pytest.raises(ValueError, match="size"):
        auroc([0, 1], [0.1])
    with pytest.raises(ValueError, match="0/1"):
        auroc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        auroc([0, 1], [0.1, float("nan")])


def slow_aupro(masks, maps, fpr_limit=0.3) -> float:
    """MVTec AD's definition, threshold by threshold: per-region overlap vs FPR, trapezoid_area(x_max)."""
    masks = np.asarray(masks) > 0.5
    maps = np.asarray(maps, dtype=np.float64)
    regions = []
    for mask in masks:
        labeled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions.append([labeled == k for k in range(1, n + 1)])
    normal = ~masks
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        flagged = maps >= t
        fprs.append((flagged & normal).sum() / normal.sum())
        pros.append(np.mean([(flagged[i] & r).sum() / r.sum() for i, rs in enumerate(regions) for r in rs]))
    x, y = np.array(fprs + [1.0]), np.array(pros + [1.0])
    correction = 0.0
    if fpr_limit not in x:
        ins = bisect(x, fpr_limit)
        y_at = y[ins - 1] + (y[ins] - y[ins - 1]) * (fpr_limit - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_at + y[ins - 1]) * (fpr_limit - x[ins - 1])
    keep = x <= fpr_limit
    x, y = x[keep], y[keep]
    return float((np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)) + correction) / fpr_limit)


def test_aupro_equals_slow_reference_on_random_cases():
    rng = np.random.default_rng(2)
    for _ in range(40):
        n, h = int(rng.integers(1, 4)), int(rng.integers(5, 14))
        masks = ndimage.binary_dilation(rng.random((n, h, h)) < 0.05, structure=np.ones((1, 2, 2)))
        if not masks.any():
            masks[0, 0, 0] = True
        maps = rng.integers(0, int(rng.integers(2, 25)), (n, h, h)).astype(np.float32)
        maps += masks * np.float32(rng.uniform(0, 4))
        for limit in (0.3, 0.05, 1.0):
            assert aupro(masks, maps, limit) == pytest.approx(slow_aupro(masks, maps, limit), abs=1e-9)


def test_aupro_hand_cases():
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[0, 1:3, 1:3] = True
    masks[1, 5:8, 4:6] = True
    assert aupro(masks, masks.astype(np.float32)) == pytest.approx(1.0)  # perfect map
    assert aupro(masks, 1.0 - masks) == 0.0  # inverted map: defects found only past FPR 1
    # constant map: the curve is the diagonal; area to 0.3 is 0.045, normalised 0.15 (0.5 with limit 1)
    assert aupro(masks, np.zeros((2, 8, 8))) == pytest.approx(0.15)
    assert aupro(masks, np.zeros((2, 8, 8)), fpr_limit=1.0) == pytest.approx(0.5)


def test_aupro_weighs_regions_not_pixels_and_uses_8_connectivity_per_image():
    # one 1-pixel region found, one 10-pixel region missed: PRO is 1/2 from FPR 0 on, whatever the sizes
    masks = np.zeros((12, 12), dtype=bool)
    masks[0, 0] = True
    masks[5, 1:11] = True
    maps = np.full((12, 12), 0.5)
    maps[0, 0], maps[5, 1:11] = 1.0, 0.0
    assert aupro(masks, maps) == pytest.approx(0.5)
    # diagonal neighbours form ONE region (8-connectivity): one pixel of it found -> 1/2 of it, and B missed
    masks = np.zeros((8, 8), dtype=bool)
    masks[0, 0] = masks[1, 1] = masks[6, 6] = True
    maps = np.full((8, 8), 0.5)
    maps[0, 0], maps[1, 1], maps[6, 6] = 1.0, 0.0, 0.0
    assert aupro(masks, maps) == pytest.approx(0.25)  # 4-connectivity would give 1/3
    # regions never connect across images of the stack
    masks = np.zeros((2, 6, 6), dtype=bool)
    masks[0, 2, 2] = True
    masks[1, 2, 1:4] = True
    maps = np.full((2, 6, 6), 0.5)
    maps[0, 2, 2], maps[1, 2, 1:4] = 1.0, 0.0
    assert aupro(masks, maps) == pytest.approx(0.5)


def test_aupro_degenerate_and_bad_input():
    assert math.isnan(aupro(np.zeros((4, 4)), np.random.rand(4, 4)))  # no defect region
    assert math.isnan(aupro(np.ones((4, 4)), np.random.rand(4, 4)))  # no normal pixel
    with pytest.raises(ValueError, match="shape"):
        aupro(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(np.eye(4), np.eye(4), fpr_limit=0.0)


def test_pixel_metrics_match_the_single_metrics():
    rng = np.random.default_rng(3)
    masks = ndimage.binary_dilation(rng.random((3, 16, 16)) < 0.03, structure=np.ones((1, 3, 3)))
    maps = (rng.random((3, 16, 16)) + masks * 0.5).astype(np.float32)
    got = pixel_metrics(torch.from_numpy(masks.astype(np.float32)), torch.from_numpy(maps))
    assert got["auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert got["ap"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert got["f1max"] == pytest.approx(_sklearn_f1_max(masks.ravel(), maps.ravel()), abs=1e-12)
    assert got["aupro"] == pytest.approx(slow_aupro(masks, maps), abs=1e-9)
