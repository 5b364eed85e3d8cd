"""The calibration hold-out drawn per cluster of the training images (``omniad.holdout``), the per-cluster
false-alarm rates it leaves in the calibration, and CADA's out-of-fold targets over a memorising base."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omniad.calibration import Calibration
from omniad.data.sources import split_holdout
from omniad.holdout import cluster_labels, pooled_features, stratified_indices
from omniad.registry import create_detector

SIZE = 32


@pytest.mark.parametrize(("sizes", "fraction"), [((90, 9, 1), 0.1), ((5, 5), 0.5), ((50, 50, 3), 0.1),
                                                  ((18, 2), 0.1), ((1, 1, 1, 1), 0.5), ((200, 7, 7, 7), 0.05)])
def test_every_cluster_gets_its_share_and_keeps_images_in_training(sizes, fraction):
    labels = np.repeat(np.arange(len(sizes)), sizes)
    kept, held = stratified_indices(labels, fraction, seed=0)
    assert sorted(kept + held) == list(range(labels.size)) and not set(kept) & set(held)
    assert len(held) == round(fraction * labels.size)
    taken = np.bincount(labels[held], minlength=len(sizes))
    sizes = np.array(sizes)
    big = sizes >= 2
    if len(held) >= big.sum():
        assert (taken[big] >= 1).all()  # every cluster of two or more images is represented
    assert (taken[big] <= sizes[big] - 1).all()  # and keeps at least one image in training
    raised = int((big & (fraction * sizes < 1)).sum())  # small clusters given one place by the minimum
    assert np.abs(taken - fraction * sizes).max() <= 1.0 + raised + 1e-9  # in proportion, to one image each
    assert stratified_indices(labels, fraction, seed=0) == (kept, held)  # seeded


def _line(n_common: int, n_rare: int) -> torch.Tensor:
    """Two kinds of image: many dark-red ones, a few light-blue ones."""
    g = torch.Generator().manual_seed(0)
    common = torch.tensor([0.6, 0.2, 0.2])[None, :, None, None] + 0.05 * torch.rand(n_common, 3, SIZE, SIZE,
                                                                                    generator=g)
    rare = torch.tensor([0.3, 0.6, 0.9])[None, :, None, None] + 0.05 * torch.rand(n_rare, 3, SIZE, SIZE, generator=g)
    return torch.cat([common, rare]).clamp(0, 1)


def test_the_clusters_of_pooled_features_separate_the_kinds_of_image():
    images = _line(40, 5)
    for backbone in (None, create_detector("padim", weights="random", image_size=SIZE, device="cpu",
                                           progress=False).prepare().backbone_):
        labels = cluster_labels(pooled_features(backbone, images, 8, "cpu"), 2, seed=0)
        assert len(set(labels[:40])) == 1 and len(set(labels[40:])) == 1 and labels[0] != labels[40]


def test_a_rare_kind_is_always_held_out_and_reported_per_cluster():
    images = _line(45, 5)
    misses = [s for s in range(10)
              if not (np.array(split_holdout(images, 0.1, s)[1].indices) >= 45).any()]
    assert misses, "a random 10% does leave the rare kind out for some seeds"  # the case this is for
    for seed in misses[:3]:
        detector = create_detector("padim", weights="random", image_size=SIZE, device="cpu", progress=False,
                                   batch_size=16, seed=seed, calibration_strata=2).fit(images)
        calibration = detector.calibration_
        rows = calibration.group_rates()
        assert len(rows) == 2 and sum(r["images"] for r in rows) == 5 == calibration.normal_scores.size
        assert sorted(r["images"] for r in rows) == [1, 4]  # 10% of each kind: 4.5 and 0.5, largest remainders
        assert sum(r["flagged"] for r in rows) == int((calibration.normal_scores > calibration.threshold).sum())
        assert "drawn from each of 2 clusters" in calibration.source
        assert "per cluster of the training images: #" in calibration.describe_groups()
    plain = create_detector("padim", weights="random", image_size=SIZE, device="cpu", progress=False,
                            batch_size=16, seed=misses[0], calibration_strata=0).fit(images)
    assert plain.calibration_.normal_groups is None and plain.calibration_.group_rates() == []


def test_the_groups_follow_the_scores_through_sorting_saving_and_another_rate():
    scores, groups = np.array([3.0, 1.0, 2.0, 5.0, 4.0]), np.array([0, 1, 1, 2, 0])
    calibration = Calibration.from_normal_scores(scores, 0.2, "test", groups)
    assert calibration.normal_scores.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert calibration.normal_groups.tolist() == [1, 1, 0, 0, 2]
    assert calibration.group_rates(threshold=3.5) == [
        {"group": 0, "images": 2, "flagged": 1, "rate": 0.5}, {"group": 1, "images": 2, "flagged": 0, "rate": 0.0},
        {"group": 2, "images": 1, "flagged": 1, "rate": 1.0}]
    again = Calibration.from_dict(calibration.to_dict())
    assert again.normal_groups.tolist() == calibration.normal_groups.tolist()
    assert calibration.at(0.4).normal_groups.tolist() == calibration.normal_groups.tolist()
    tampered = {**calibration.to_dict(), "normal_groups": [0, 1]}
    with pytest.raises(ValueError, match="normal_groups must be a list of 5 integers"):
        Calibration.from_dict(tampered, where="model.json")
    with pytest.raises(ValueError, match="2 groups given for 5 normal scores"):
        Calibration.from_normal_scores(scores, 0.2, "test", [0, 1])


def test_calibration_strata_is_checked():
    with pytest.raises(ValueError, match="calibration_strata must be"):
        create_detector("padim", weights="random", image_size=SIZE, device="cpu", calibration_strata=-1,
                        progress=False).fit(_line(8, 2))


# ------------------------------------------------------------------ CADA's targets
def _cada(**params):
    return create_detector("cada", base="padim", weights="random", image_size=SIZE, device="cpu", progress=False,
                           batch_size=16, calibration_fraction=0.0, iterations=5, **params)


def test_cada_takes_out_of_fold_targets_over_a_memorising_base_only():
    assert _cada().resolved_params()["target_folds"] == 2  # PaDiM memorises its training images
    trained = create_detector("cada", base="revdist", weights="random", image_size=SIZE, device="cpu")
    assert trained.resolved_params()["target_folds"] == 0  # the paper's in-sample targets
    with pytest.raises(ValueError, match="target_folds must be 0 .* or at least 2 folds, got 1"):
        _cada(target_folds=1).resolved_params()


def test_out_of_fold_maps_are_those_of_new_normals_not_of_memorised_ones():
    """PaDiM maps its own training images lower and flatter than any new normal image (here 24 images, fewer than
    its feature dimensions: mean 2.5 against 3.1, spread 0.30 against 0.48); a copy fitted without an image maps
    it as it maps new ones (3.2, 0.60)."""
    g = torch.Generator().manual_seed(1)
    images = (0.5 + 0.1 * torch.rand(24, 3, SIZE, SIZE, generator=g)).clamp(0, 1)
    in_sample = _cada(target_folds=0)
    own = in_sample.extract(images)
    out_of_fold = _cada(target_folds=2)
    folds = out_of_fold.extract(images)
    new = (0.5 + 0.1 * torch.rand(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    new_maps = out_of_fold.base_.score(new).anomaly_maps.flatten(1).double()
    new_stats = {"u": new_maps.mean().item(), "spread": (new_maps.max(1).values - new_maps.mean(1)).mean().item()}
    for key in ("u", "spread"):
        stats = {name: (d.moments[:, 0] if key == "u" else d.moments[:, 1] - d.moments[:, 0]).mean().item()
                 for name, d in (("own", own), ("folds", folds))}
        assert stats["folds"] > stats["own"]
        assert abs(np.log(stats["folds"] / new_stats[key])) < abs(np.log(stats["own"] / new_stats[key])) / 2
    # the base that scores is fitted on every image either way, and the same features are read
    torch.testing.assert_close(out_of_fold.base_.score(new).image_scores, in_sample.base_.score(new).image_scores)
    torch.testing.assert_close(folds.features, own.features)
