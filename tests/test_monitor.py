"""The alarm monitor: the binomial test against the calibrated false-alarm rate, its sliding window, and the
warning of ``predict`` / ``omniad predict`` and of the service (``/predict``'s ``monitor``, ``GET /metrics``) on a
stream of shifted normals, which clean normals do not trip."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from omniad.calibration import Calibration
from omniad.monitor import MIN_IMAGES, AlarmMonitor, calibration_counts, check_alarms
from omniad.prediction import predict
from omniad.registry import create_detector

SIZE = 64


def _upper_tail(k: int, m: int, a: int, n: int) -> float:
    """P(X >= k) for X ~ BetaBinomial(m, a + 1, n - a): C(m, i) B(i + alpha, m - i + beta) / B(alpha, beta) summed."""
    alpha, beta = a + 1, n - a

    def log_beta(x: float, y: float) -> float:
        return math.lgamma(x) + math.lgamma(y) - math.lgamma(x + y)

    return sum(math.comb(m, i) * math.exp(log_beta(i + alpha, m - i + beta) - log_beta(alpha, beta))
               for i in range(k, m + 1))


@pytest.mark.parametrize(("alarms", "images", "normals", "above"),
                         [(1, 50, 100, 1), (3, 50, 100, 1), (9, 200, 1000, 20), (30, 40, 20, 2)])
def test_the_p_value_is_the_beta_binomial_upper_tail(alarms, images, normals, above):
    check = check_alarms(images, alarms, normals, above)
    assert check.p_value == pytest.approx(_upper_tail(alarms, images, above, normals), rel=1e-6)
    assert check.departed == (check.p_value < check.significance)
    assert check.rate == alarms / images and check.expected_rate == (above + 1) / (normals + 1)


def test_with_many_held_out_normals_it_is_the_binomial_test():
    from scipy.stats import binomtest

    check = check_alarms(200, 8, 100_000, 999)  # a rate of 1%, known to +-0.03%
    assert check.p_value == pytest.approx(binomtest(8, 200, 0.01, alternative="greater").pvalue, rel=0.02)


def test_a_small_held_out_set_widens_the_test():
    # 10 of 60 clean normals flagged by a threshold with 1 of 20 held-out normals above it (this file's PaDiM):
    # a binomial test at 5% calls it a departure (p = 7e-4), the calibration's own uncertainty does not
    from scipy.stats import binomtest

    assert binomtest(10, 60, 0.05, alternative="greater").pvalue < 1e-3
    assert not check_alarms(60, 10, 20, 1).departed


def test_departure_needs_enough_images_and_a_significant_excess():
    assert not check_alarms(MIN_IMAGES - 1, MIN_IMAGES - 1, 999, 9).departed  # every one flagged, but too few
    assert check_alarms(MIN_IMAGES, 5, 999, 9).departed  # 25% where 1% is expected
    assert not check_alarms(200, 4, 999, 9).departed  # 2% of 200 where 1% is expected: chance
    assert "omniad calibrate" in check_alarms(100, 20, 999, 9).message()
    assert "consistent with the calibration" in check_alarms(100, 1, 999, 9).message()
    assert not check_alarms(100, 100, 20, 20).departed  # a threshold under every held-out normal expects this


@pytest.mark.parametrize(("images", "alarms", "normals", "above", "match"), [
    (10, 11, 100, 1, "0 <= alarms <= images"), (10, -1, 100, 1, "0 <= alarms <= images"),
    (10, 1, 0, 0, "0 <= above <= normals"), (10, 1, 5, 6, "0 <= above <= normals"),
])
def test_bad_counts_are_refused(images, alarms, normals, above, match):
    with pytest.raises(ValueError, match=match):
        check_alarms(images, alarms, normals, above)


def test_the_calibration_gives_the_counts():
    normals = np.linspace(0, 1, 20)
    assert calibration_counts(Calibration.from_normal_scores(normals, 0.0, "t")) == (20, 0)
    assert calibration_counts(Calibration.from_normal_scores(normals, 0.1, "t")) == (20, 2)
    bare = Calibration(1.0, float("nan"), np.empty(0), "given by the user")
    assert calibration_counts(bare) is None
    with pytest.raises(ValueError, match="no calibrated false-alarm rate"):
        AlarmMonitor(bare)


def test_the_window_forgets_old_images():
    monitor = AlarmMonitor(Calibration.from_normal_scores(np.linspace(0, 1, 1000), 0.01, "t"), window=100)
    assert not monitor.update([False] * 300).departed
    burst = monitor.update([True] * 10)  # 10 of the latest 100 where 1% is expected
    assert burst.departed and burst.images == 100 and burst.alarms == 10
    assert not monitor.update([False] * 100).departed  # the burst left the window
    assert (monitor.total_images, monitor.total_alarms) == (410, 10)


# ------------------------------------------------------------------ a model on a stream of images
def _normals(n: int, seed: int) -> torch.Tensor:
    """One product's normal images: a fixed smooth pattern under small per-image noise."""
    base_g = torch.Generator().manual_seed(123)
    base = F.interpolate(torch.rand(1, 3, 8, 8, generator=base_g), size=SIZE, mode="bilinear", align_corners=False)
    noise = 0.03 * torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    return (0.2 + 0.6 * base + noise).clamp(0, 1)


def _shifted(images: torch.Tensor) -> torch.Tensor:
    """The line's shift: a brighter lamp and a softer focus."""
    blurred = F.avg_pool2d(images, 5, stride=1, padding=2, count_include_pad=False)
    return (blurred * 1.3 + 0.05).clamp(0, 1)


@pytest.fixture(scope="module")
def detector():
    return create_detector("padim", weights="random", image_size=SIZE, batch_size=16, device="cpu", progress=False,
                           calibration_fraction=0.25, target_far=0.05).fit(_normals(80, seed=0))


def test_predict_warns_on_shifted_normals_and_not_on_clean_ones(detector):
    clean = predict(detector, _normals(60, seed=1))
    assert clean.alarm_check is not None and not clean.alarm_check.departed
    assert "warning: alarm rate" not in clean.summary()
    shifted = predict(detector, _shifted(_normals(60, seed=2)))
    check = shifted.alarm_check
    assert check.departed and check.images == 60 and check.alarms == shifted.n_flagged
    assert (check.normals, check.normals_above) == calibration_counts(detector.calibration_)
    assert "warning: alarm rate" in shifted.summary() and "omniad adapt" in shifted.summary()
    assert shifted.to_dict()["alarm_check"]["departed"] is True


def test_omniad_predict_prints_the_warning(detector, tmp_path, capsys):
    from omniad.cli import main

    detector.save(tmp_path / "model")
    folder = tmp_path / "shifted"
    folder.mkdir()
    for i, image in enumerate(_shifted(_normals(30, seed=3))):
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(folder / f"{i}.png")
    assert main(["predict", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "out"), str(folder)]) == 0
    out = capsys.readouterr().out
    assert "warning: alarm rate" in out and "of 30 images flagged" in out


def test_the_service_warns_and_exports_the_counts_to_prometheus(detector):
    pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'omniad[serve]'")
    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families

    from omniad.serve import create_app

    def post(client, images: torch.Tensor) -> dict:
        import io

        files = []
        for i, image in enumerate(images):
            buffer = io.BytesIO()
            Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(buffer, "PNG")
            files.append(("files", (f"{i}.png", buffer.getvalue(), "image/png")))
        response = client.post("/predict", files=files)
        assert response.status_code == 200
        return response.json()

    def samples(client) -> dict[str, float]:
        text = client.get("/metrics").text
        return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}

    with TestClient(create_app(detector, max_batch=32, monitor_window=40)) as client:
        clean = [post(client, _normals(20, seed=s)) for s in (4, 5)]
        assert not clean[-1]["monitor"]["departed"] and clean[-1]["monitor"]["images"] == 40
        assert samples(client)["omniad_alarm_rate_departed"] == 0.0
        shifted = [post(client, _shifted(_normals(20, seed=s))) for s in (6, 7)]
        monitor = shifted[-1]["monitor"]
        assert monitor["departed"] and monitor["images"] == 40 and "omniad calibrate" in monitor["message"]
        assert client.get("/health").json()["monitor"]["departed"] is True
        values = samples(client)
        flagged = sum(r["anomalous"] for body in clean + shifted for r in body["results"])
        assert values["omniad_images_total"] == 80 and values["omniad_requests_total"] == 4
        assert values["omniad_alarms_total"] == flagged
        assert values["omniad_image_score_count"] == 80
        assert values["omniad_alarm_rate"] == monitor["rate"] and values["omniad_alarm_rate_departed"] == 1.0
        n, above = calibration_counts(detector.calibration_)
        assert values["omniad_alarm_rate_expected"] == pytest.approx((above + 1) / (n + 1))
        assert values["omniad_target_far"] == pytest.approx(detector.calibration_.target_far)
        assert values["omniad_threshold"] == detector.calibration_.threshold
