"""threshold_at_far: the operator's threshold from normal scores only."""

from __future__ import annotations

import json

import numpy as np
import pytest

from omniad.calibration import Calibration, threshold_at_far


def _flagged_share(scores: np.ndarray, threshold: float) -> float:
    return float(np.mean(scores > threshold))


@pytest.mark.parametrize("n", [1, 7, 50, 100, 333])
@pytest.mark.parametrize("far", [0.0, 0.01, 0.05, 0.1, 0.29, 0.5, 0.9])
def test_threshold_is_smallest_score_meeting_the_false_alarm_rate(n, far):
    scores = np.random.default_rng(n).normal(size=n)
    threshold = threshold_at_far(scores, far)
    assert threshold in scores
    assert _flagged_share(scores, threshold) <= far + 1e-12
    # every smaller candidate among the scores flags too many
    smaller = scores[scores < threshold]
    if smaller.size:
        assert _flagged_share(scores, smaller.max()) > far


def test_far_zero_gives_the_max_score():
    scores = np.array([0.3, 2.5, -1.0, 2.4])
    assert threshold_at_far(scores, 0.0) == 2.5
    assert _flagged_share(scores, threshold_at_far(scores, 0.0)) == 0.0


def test_hand_case():
    scores = np.arange(10, dtype=float)  # 0..9
    assert threshold_at_far(scores, 0.1) == 8.0  # flags only 9
    assert threshold_at_far(scores, 0.25) == 7.0  # 2 of 10 may be flagged (not 2.5)
    assert threshold_at_far(scores, 0.5) == 4.0  # flags 5..9


def test_ties_never_flag_more_than_allowed():
    scores = np.array([1.0, 1.0, 1.0, 1.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0])
    # 10% may be flagged but the top 6 are tied: flagging any of them flags all six -> threshold is the max
    assert threshold_at_far(scores, 0.1) == 5.0
    # 60% may be flagged: the six 5s, threshold at 1 (strictly above 1 is flagged)
    assert threshold_at_far(scores, 0.6) == 1.0
    assert _flagged_share(scores, 1.0) == 0.6


def test_accepts_lists_and_tensors_of_any_shape():
    torch = pytest.importorskip("torch")
    assert threshold_at_far([[3.0, 1.0], [2.0, 4.0]], 0.25) == 3.0
    assert threshold_at_far(torch.tensor([3.0, 1.0, 2.0, 4.0]), 0.25) == 3.0


def test_empty_or_non_finite_scores_are_refused():
    with pytest.raises(ValueError, match="empty"):
        threshold_at_far(np.array([]), 0.01)
    with pytest.raises(ValueError, match="non-finite"):
        threshold_at_far(np.array([1.0, float("nan")]), 0.01)


def test_calibration_decides_recalibrates_and_round_trips():
    cal = Calibration.from_normal_scores(np.arange(100.0), 0.05, "held out")
    assert cal.threshold == 94.0 and cal.false_alarm_rate() == 0.05
    assert cal.decide(np.array([94.0, 94.5])).tolist() == [False, True]
    with pytest.raises(ValueError, match="NaN or infinite .* position 1"):
        cal.decide(np.array([1.0, float("nan")]))
    assert cal.at(0.2).threshold == 79.0 and cal.at(0.2).normal_scores.size == 100
    again = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert again.threshold == cal.threshold and again.target_far == 0.05 and again.source == "held out"


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"threshold": "high"}, "threshold must be a finite number"),
        ({"threshold": None}, "threshold must be a finite number"),
        ({"target_far": 1.5}, "target_far must be in"),
        ({"normal_scores": []}, "non-empty list"),
        ({"normal_scores": [1, "x"]}, "numbers only"),
        ({"threshold": 3.0}, "does not follow from its normal scores"),
    ],
)
def test_tampered_calibration_is_refused(change, match):
    data = {**Calibration.from_normal_scores(np.arange(10.0), 0.1, "x").to_dict(), **change}
    with pytest.raises(ValueError, match=match):
        Calibration.from_dict(data, "model/config.json")


@pytest.mark.parametrize("far", [-0.1, 1.0, 1.5, float("nan")])
def test_invalid_far_raises(far):
    with pytest.raises(ValueError, match="target_far"):
        threshold_at_far(np.array([1.0, 2.0]), far)
    with pytest.raises(ValueError, match="target_far"):
        threshold_at_far(np.array([]), far)
