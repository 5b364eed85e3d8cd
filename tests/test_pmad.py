"""PMAD: masks, token scoring, the visual tokenizer, the network's no-leak property and the detector's rounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from omniad import create_detector, load_detector
from omniad.cluster import kmeans, nearest_centres
from omniad.methods.pmad.masking import (
    blockwise_mask,
    inference_rounds,
    num_masked,
    proposal_mask,
    random_mask,
    training_mask,
)
from omniad.methods.pmad.network import PMADNet, token_cross_entropy, token_entropy
from omniad.methods.pmad.tokenizer import VisualTokenizer

TINY = dict(preset="cpu", image_size=32, patch_size=8, weights="random", device="cpu", progress=False, seed=0,
            epochs=2, warmup_epochs=1, num_tokens=12, num_prototypes=6, embed_dim=32, depth=1, num_heads=2,
            batch_size=8, calibration_fraction=0.2)


# ----------------------------------------------------------------- masks
def test_proposal_mask_hides_exactly_the_top_m_percent_hand_case():
    distances = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.8, 0.2, 0.7, 0.4, 0.6, 0.0],
                              [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 2.0]])
    mask = proposal_mask(distances, 0.3)
    assert mask[0].nonzero().flatten().tolist() == [1, 4, 6]
    assert mask[1].nonzero().flatten().tolist() == [0, 8, 9]


def test_num_masked_rounds_and_keeps_context():
    assert num_masked(256, 0.3) == 77
    assert num_masked(4, 0.01) == 1 and num_masked(4, 0.99) == 3
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        num_masked(16, 1.0)


@pytest.mark.parametrize("strategy", ["combined", "random", "blockwise"])
def test_training_masks_hide_exactly_the_ratio(strategy):
    mask = training_mask(16, (14, 14), 0.3, strategy, np.random.default_rng(0))
    assert mask.shape == (16, 196) and mask.dtype == torch.bool
    assert (mask.sum(1) == round(0.3 * 196)).all()


def _neighbour_share(mask: torch.Tensor, grid: tuple[int, int]) -> float:
    """Share of hidden patches with a hidden 4-neighbour."""
    m = mask.view(-1, *grid).float()
    padded = torch.nn.functional.pad(m, (1, 1, 1, 1))
    neighbours = padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
    return float(((neighbours > 0) & (m > 0)).sum() / m.sum())


def test_blockwise_masks_are_blocks_random_masks_are_not():
    rng = np.random.default_rng(0)
    block = blockwise_mask(32, (14, 14), 40, rng)
    scattered = random_mask(32, (14, 14), 40, rng)
    assert (block.sum(1) == 40).all() and (scattered.sum(1) == 40).all()
    assert _neighbour_share(block, (14, 14)) > 0.9
    assert _neighbour_share(scattered, (14, 14)) < 0.6


def test_masks_are_repeatable_from_the_seed():
    a = training_mask(4, (8, 8), 0.3, "combined", np.random.default_rng(3))
    b = training_mask(4, (8, 8), 0.3, "combined", np.random.default_rng(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("strategy", ["proposal", "random", "blockwise"])
@pytest.mark.parametrize("grid, ratio", [((4, 4), 0.3), ((7, 5), 0.25), ((16, 16), 0.3)])
def test_rounds_predict_every_patch_exactly_once(strategy, grid, ratio):
    distances = torch.rand(3, grid[0] * grid[1], generator=torch.Generator().manual_seed(1))
    rounds = inference_rounds(strategy, distances, grid, ratio, np.random.default_rng(0))
    assert len(rounds) == math.ceil(grid[0] * grid[1] / num_masked(grid[0] * grid[1], ratio))
    assert (torch.stack(rounds).sum(0) == 1).all()
    assert all(bool(((~r).sum(1) > 0).all()) for r in rounds)  # context is never empty
    if strategy == "proposal":
        assert torch.equal(rounds[0], proposal_mask(distances, ratio))


# ----------------------------------------------------------------- scores
def test_entropy_hand_cases():
    k = 7
    assert token_entropy(torch.zeros(2, k)).tolist() == pytest.approx([math.log(k)] * 2, rel=1e-6)
    one_hot = torch.full((k,), -1e4)
    one_hot[3] = 1e4
    assert float(token_entropy(one_hot)) == pytest.approx(0.0, abs=1e-6)
    two = torch.tensor([0.0, 0.0, -1e4])  # two equally likely tokens
    assert float(token_entropy(two)) == pytest.approx(math.log(2), rel=1e-6)


def test_cross_entropy_of_the_observed_token():
    p = torch.tensor([0.5, 0.25, 0.125, 0.125])
    logits = p.log().expand(3, 4)
    ce = token_cross_entropy(logits, torch.tensor([0, 1, 3]))
    assert ce.tolist() == pytest.approx([math.log(2), math.log(4), math.log(8)], rel=1e-5)


# ----------------------------------------------------------------- tokenizer
def test_kmeans_is_seeded_and_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat([c + 0.1 * torch.randn(50, 2, generator=g) for c in centres])
    found = kmeans(points, 3, seed=0)
    assert torch.equal(found, kmeans(points, 3, seed=0))
    dist, _ = nearest_centres(centres, found)
    assert (dist < 0.2).all()


def test_tokenizer_determinism_save_load_and_nearest_code():
    feats = torch.randn(400, 6, generator=torch.Generator().manual_seed(0)) * torch.arange(1.0, 7.0)
    a = VisualTokenizer(16, 6).fit(feats, seed=1)
    b = VisualTokenizer(16, 6).fit(feats, seed=1)
    c = VisualTokenizer(16, 6).fit(feats, seed=2)
    assert torch.equal(a.codebook, b.codebook) and not torch.equal(a.codebook, c.codebook)
    tokens = a.encode(feats[:50])
    brute = torch.cdist(a.standardise(feats[:50]), a.codebook).argmin(1)
    assert torch.equal(tokens, brute)
    restored = VisualTokenizer(16, 6)
    restored.load_state_dict(a.state_dict())
    assert torch.equal(restored.encode(feats), a.encode(feats))
    assert a.encode(feats.view(20, 20, 6)).shape == (20, 20)


def test_tokenizer_vocabulary_shrinks_to_the_data():
    assert VisualTokenizer(64, 3).fit(torch.randn(10, 3)).num_tokens == 10


# ----------------------------------------------------------------- network
def test_hidden_patches_do_not_leak_and_modes_agree():
    torch.manual_seed(0)
    net = PMADNet(in_dim=5, num_tokens=9, grid=(3, 4), embed_dim=16, depth=2, num_heads=2)
    x = torch.randn(2, 12, 5)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, [1, 5, 6]] = True
    mask[1, [0, 11]] = True
    changed = x.clone()
    changed[mask] = torch.randn(int(mask.sum()), 5) * 100
    net.eval()
    out = net(x, mask)
    assert out.shape == (2, 12, 9)
    torch.testing.assert_close(net(changed, mask), out)
    net.train()
    torch.testing.assert_close(net(x, mask), out)
    with pytest.raises(ValueError, match="visible"):
        net(x, torch.ones(2, 12, dtype=torch.bool))


# ----------------------------------------------------------------- detector
@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(1, 3, 32, 32, generator=g) * 0.2 + 0.4
    return (base + 0.05 * torch.rand(14, 3, 32, 32, generator=g)).clamp(0, 1)


@pytest.fixture(scope="module")
def fitted(images):
    return create_detector("pmad", **TINY).fit(images[:10])


def test_detector_masks_the_top_m_percent_by_prototype_distance_first(fitted, images):
    seen = []
    original = fitted.net_.forward

    def spy(x, mask):
        seen.append(mask.clone())
        return original(x, mask)

    fitted.net_.forward = spy
    try:
        variants = fitted.patch_score_variants(fitted.features(images[10:]))
    finally:
        del fitted.net_.forward
    scores, distances = variants["entropy"], variants["prototype"]
    k = num_masked(16, fitted.resolved_.mask_ratio)
    top = distances.topk(k, dim=1).indices
    expected = torch.zeros_like(seen[0]).scatter_(1, top, True)
    assert torch.equal(seen[0], expected)
    assert (torch.stack(seen).sum(0) == 1).all()
    assert scores.shape == (4, 16) and torch.isfinite(scores).all()
    assert (scores <= math.log(fitted.tokenizer_.num_tokens) + 1e-5).all()  # entropies are at most log K


def test_detector_save_load_identical_scores(fitted, images, tmp_path):
    before = fitted.score(images[10:])
    assert before.anomaly_maps.shape == (4, 32, 32)
    fitted.save(tmp_path / "pmad")
    loaded = load_detector(tmp_path / "pmad")
    after = loaded.score(images[10:])
    torch.testing.assert_close(after.image_scores, before.image_scores, rtol=0, atol=1e-6)
    torch.testing.assert_close(after.anomaly_maps, before.anomaly_maps, rtol=0, atol=1e-6)
    assert loaded.get_params() == fitted.get_params()


def test_detector_is_seed_deterministic_and_scoring_is_selectable(fitted, images):
    again = create_detector("pmad", **TINY).fit(images[:10])
    torch.testing.assert_close(again.score(images[10:]).image_scores, fitted.score(images[10:]).image_scores)
    assert fitted.resolved_.scoring == "cross_entropy" and fitted.resolved_.prototype_weighting
    features = fitted.features(images[10:])
    weighted, distances = fitted.patch_scores(features)
    textual = fitted.clone().set_params(scoring="entropy", prototype_weighting=False).fit(images[:10])
    entropy, _ = textual.patch_scores(features)  # the same net (seeded fit), the paper's scoring
    variants = fitted.patch_score_variants(features)
    torch.testing.assert_close(weighted, variants["cross_entropy"] * distances)
    torch.testing.assert_close(entropy, variants["entropy"])
    assert not torch.allclose(variants["entropy"], variants["cross_entropy"])
    both = fitted.score_variants(images[10:])
    assert set(both) == {"entropy", "cross_entropy", "prototype", "entropy*prototype", "cross_entropy*prototype"}
    torch.testing.assert_close(both["cross_entropy*prototype"].image_scores, fitted.score(images[10:]).image_scores)


def test_presets_and_bad_parameters():
    paper = create_detector("pmad").resolved_params()
    assert tuple(paper[k] for k in ("embed_dim", "depth", "num_tokens", "epochs")) == (768, 12, 8192, 300)
    cpu = create_detector("pmad", preset="cpu", depth=5).resolved_params()
    assert cpu["depth"] == 5 and cpu["embed_dim"] < 768  # explicit values win over the preset
    for bad, match in ((dict(preset="gpu"), "unknown preset"), (dict(scoring="mse"), "scoring must be one of"),
                       (dict(inference_masking="grid"), "inference_masking"), (dict(mask_ratio=1.5), "mask_ratio"),
                       (dict(image_size=250), "not a multiple of patch_size"), (dict(num_prototypes=0), "num_pro")):
        with pytest.raises(ValueError, match=match):
            create_detector("pmad", **bad).resolved_params()


def test_score_resizes_another_image_size(fitted):
    from omniad.data.images import resize_image

    other = torch.rand(1, 3, 40, 40)
    assert fitted.score(other).anomaly_maps.shape == (1, 32, 32)
    torch.testing.assert_close(fitted.score(other).image_scores, fitted.score(resize_image(other, 32)).image_scores)


def test_the_image_residual_removes_what_a_whole_image_shares():
    """feature_residual="image": a patch feature minus its image's mean, so a brightness or texture shift common
    to every patch of an image (what tells one product type from another) does not reach tokens or prototypes."""
    kwargs = dict(preset="cpu", patch_size=8, weights="random", image_size=32, device="cpu", progress=False)
    detector = create_detector("pmad", feature_residual="image", **kwargs).prepare()
    images = torch.rand(2, 3, 32, 32)
    features = detector.features(images)
    assert features.mean((2, 3)).abs().max() < 1e-5
    from omniad.features import fuse_stages

    plain = fuse_stages(detector.backbone_(images), size=detector.grid, mode="area")  # the paper's features
    torch.testing.assert_close(features, plain - plain.mean((2, 3), keepdim=True))
