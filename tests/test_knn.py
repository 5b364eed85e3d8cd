"""The nearest-neighbour baseline (DN2): its image score is the mean distance of the pooled feature to the k
nearest pooled training features, computed here by hand; its map is on the same scale."""

from __future__ import annotations

import pytest
import torch

from omniad import create_detector

COMMON = dict(weights="random", image_size=64, batch_size=4, device="cpu", progress=False, seed=0,
              calibration_fraction=0.0)


@pytest.fixture(scope="module")
def images():
    generator = torch.Generator().manual_seed(0)
    return torch.rand(10, 3, 64, 64, generator=generator), torch.rand(5, 3, 64, 64, generator=generator)


def _pooled(detector, x, normalize):
    with torch.no_grad():
        pooled = detector.backbone_(x)[-1].mean(dim=(2, 3))
    return torch.nn.functional.normalize(pooled, dim=1) if normalize else pooled


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("k", [1, 3])
def test_image_score_is_the_mean_distance_to_the_k_nearest_training_images(images, k, normalize):
    train, test = images
    detector = create_detector("knn", k=k, normalize=normalize, **COMMON).fit(train)
    bank, query = _pooled(detector, train, normalize), _pooled(detector, test, normalize)
    distances = torch.stack([torch.stack([(q - b).norm() for b in bank]) for q in query])
    expected = distances.sort(dim=1).values[:, :k].mean(dim=1)
    torch.testing.assert_close(detector.score(test).image_scores, expected, rtol=1e-4, atol=1e-5)


def test_a_training_image_is_its_own_nearest_neighbour(images):
    train, test = images
    detector = create_detector("knn", k=1, **COMMON).fit(train)
    assert detector.score(train).image_scores.abs().max() < 1e-3
    assert detector.score(test).image_scores.min() > 1e-2


def test_unit_length_features_bound_the_score_by_two(images):
    train, test = images
    scores = create_detector("knn", normalize=True, **COMMON).fit(train).score(1.0 - test).image_scores
    assert (scores >= 0).all() and (scores <= 2.0 + 1e-5).all()


def test_few_shot_adaptation_adds_the_new_images_as_neighbours(images):
    train, test = images
    detector = create_detector("knn", k=1, **COMMON).fit(train)
    assert detector.score(test[:2]).image_scores.min() > 1e-2
    detector.adapt_prototypes(test[:2])
    assert detector.net_.bank.shape[0] == len(train) + 2
    assert detector.score(test[:2]).image_scores.abs().max() < 1e-3


def test_k_must_be_a_positive_whole_number():
    with pytest.raises(ValueError, match="k"):
        create_detector("knn", k=0, **COMMON).resolved_params()
