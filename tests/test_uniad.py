"""UniAD: neighbor mask, feature jittering, layer-wise queries, purity, training, persistence, presets."""

from __future__ import annotations

import pytest
import torch

from omniad import create_detector, load_detector
from omniad.methods.uniad import PRESETS, UniAD, UniADNet, feature_jitter, neighbor_attention_mask, neighbor_blocked

# A transformer small enough for seconds on a 2-core CPU: 64 px images, stride 16 -> a 4 x 4 token grid.
TINY = dict(
    weights="random", image_size=64, device="cpu", progress=False, seed=0, batch_size=8,
    hidden_dim=32, num_encoder_layers=1, num_decoder_layers=2, num_heads=4, dim_feedforward=64,
    feature_stride=16, neighbor_size=3, epochs=3, train_batch_size=4, lr=1e-3, calibration_fraction=0.25,
)


def _net(**kw) -> UniADNet:
    args = dict(in_channels=12, grid=(4, 5), hidden_dim=16, num_encoder_layers=1, num_decoder_layers=2,
                num_heads=2, dim_feedforward=32, neighbor_size=3)
    args.update(kw)
    return UniADNet(**args)


def _images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.linspace(0, 1, size).view(1, 1, 1, size).expand(n, 3, size, size)
    return (0.6 * base + 0.4 * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1)


# ------------------------------------------------------------------ neighbor masked attention
@pytest.mark.parametrize("grid,k", [((5, 6), 3), ((7, 7), 5), ((4, 9), 1)])
def test_neighbor_mask_blocks_exactly_the_k_by_k_window(grid, k):
    h, w = grid
    blocked = neighbor_blocked(grid, k).view(h, w, h, w)
    half = k // 2
    for r in range(h):
        for c in range(w):
            expected = torch.zeros(h, w, dtype=torch.bool)
            expected[max(r - half, 0) : r + half + 1, max(c - half, 0) : c + half + 1] = True
            assert torch.equal(blocked[r, c], expected), (r, c)
    # borders clip the window: a corner token loses (half+1)^2 keys, an interior one k^2
    assert blocked[0, 0].sum() == (half + 1) ** 2
    assert blocked[h // 2, w // 2].sum() == k * k
    additive = neighbor_attention_mask(grid, k)
    assert torch.equal(torch.isinf(additive), blocked.view(h * w, h * w))
    assert (additive[~blocked.view(h * w, h * w)] == 0).all()


def test_neighbor_mask_that_hides_everything_is_refused():
    with pytest.raises(ValueError, match="neighbor_size"):
        neighbor_attention_mask((3, 3), 5)
    with pytest.raises(ValueError, match="odd"):
        neighbor_attention_mask((8, 8), 4)


def test_masked_output_does_not_see_its_neighbourhood():
    """With no encoder and one decoder layer, output token i may depend on input j only outside i's window."""
    torch.manual_seed(0)
    net = _net(num_encoder_layers=0, num_decoder_layers=1, dropout=0.0).eval()
    x = torch.randn(1, 12, 4, 5, requires_grad=True)
    token = (2, 1)
    net(x)[0, :, token[0], token[1]].sum().backward()
    influence = x.grad[0].abs().sum(0)  # (h, w)
    window = torch.zeros(4, 5, dtype=torch.bool)
    window[1:4, 0:3] = True
    assert (influence[window] == 0).all()
    assert (influence[~window] > 0).all()

    unmasked = _net(num_encoder_layers=0, num_decoder_layers=1, dropout=0.0, neighbor_mask=(False,) * 3).eval()
    assert unmasked.attn_mask is None
    x.grad = None
    unmasked(x)[0, :, token[0], token[1]].sum().backward()
    assert (x.grad[0].abs().sum(0)[window] > 0).all()


# ------------------------------------------------------------------ feature jittering
def test_jitter_noise_scales_with_the_feature_norm():
    torch.manual_seed(0)
    c = 64
    direction = torch.nn.functional.normalize(torch.randn(20000, c), dim=-1)
    for norm in (1.0, 10.0):
        tokens = direction * norm
        noise = feature_jitter(tokens, alpha=20.0) - tokens
        expected = 20.0 * norm / c
        assert noise.std().item() == pytest.approx(expected, rel=0.02)
        assert noise.mean().abs().item() < 0.05 * expected


def test_jitter_only_in_training_mode_and_net_is_pure():
    torch.manual_seed(0)
    x = torch.randn(3, 12, 4, 5)
    net = _net(dropout=0.0, jitter_alpha=20.0)
    net.eval()
    ref = net(x)
    torch.testing.assert_close(net(x), ref)  # eval: deterministic
    net.train()
    assert not torch.allclose(net(x), ref, atol=1e-4)  # training: jittered input
    net.jitter_alpha = 0.0
    torch.testing.assert_close(net(x), ref)  # no jitter, no dropout: same maths in both modes
    net.jitter_alpha, net.jitter_prob = 20.0, 0.0
    torch.testing.assert_close(net(x), ref)


# ------------------------------------------------------------------ layer-wise query embedding
def test_layerwise_queries_are_distinct_trained_parameters():
    torch.manual_seed(0)
    net = _net(num_decoder_layers=3)
    assert len(net.queries) == 3
    assert len({q.data_ptr() for q in net.queries}) == 3
    assert all(q.shape == (20, 16) for q in net.queries)
    assert not torch.allclose(net.queries[0], net.queries[1])
    net.eval()(torch.randn(2, 12, 4, 5)).pow(2).mean().backward()
    assert all(q.grad is not None and q.grad.abs().sum() > 0 for q in net.queries)
    assert len(_net(query_embedding="first").queries) == 1
    assert len(_net(query_embedding="none").queries) == 0
    with pytest.raises(ValueError, match="query_embedding"):
        _net(query_embedding="shared")


def test_net_rejects_features_of_another_grid():
    with pytest.raises(ValueError, match="built for"):
        _net()(torch.randn(1, 12, 5, 5))


# ------------------------------------------------------------------ presets
def test_presets_fill_only_what_is_not_given():
    paper = UniAD().resolved_params()
    assert {k: paper[k] for k in PRESETS["paper"]} == PRESETS["paper"]
    assert paper["hidden_dim"] == 256 and paper["epochs"] == 1000
    assert (paper["sigma"], paper["image_pooling"], paper["pool_kernel"]) == (0.0, "maxpool", 16)  # the paper's
    cpu = UniAD(preset="cpu", epochs=7).resolved_params()
    assert cpu["epochs"] == 7
    assert cpu["hidden_dim"] == PRESETS["cpu"]["hidden_dim"]
    with pytest.raises(ValueError, match="preset"):
        UniAD(preset="gpu").resolved_params()
    with pytest.raises(ValueError, match="query_embedding must be one of"):
        UniAD(query_embedding="sideways").resolved_params()


# ------------------------------------------------------------------ training and scoring
def test_tiny_set_overfits():
    """The loss on a few images falls by a large factor: the training loop, loss and optimiser work."""
    images = _images(4)
    params = {**TINY, "epochs": 40, "train_batch_size": 2, "lr": 1e-2, "jitter_alpha": 0.0, "dropout": 0.0,
              "calibration_fraction": 0}
    detector = create_detector("uniad", **params).fit(images)
    assert detector.loss_history_[-1] < detector.loss_history_[0] / 8


def test_fit_equals_extract_plus_fit_features_and_save_load_keeps_scores(tmp_path):
    train, test = _images(8), _images(3, seed=1)
    detector = create_detector("uniad", **TINY).fit(train)
    result = detector.score(test)
    assert result.anomaly_maps.shape == (3, 64, 64) and torch.isfinite(result.image_scores).all()
    assert len(detector.loss_history_) == TINY["epochs"]

    other = create_detector("uniad", **{**TINY, "calibration_fraction": 0})
    from omniad.data.sources import as_image_dataset

    kept, _, _ = detector.split_calibration(as_image_dataset(train))  # the fit's hold-out (its frozen backbone)
    seen = []
    other.fit_features(other.extract(kept), epoch_callback=lambda epoch, loss: seen.append((epoch, loss)))
    assert [e for e, _ in seen] == list(range(TINY["epochs"]))
    torch.testing.assert_close(other.score(test).image_scores, result.image_scores)
    torch.testing.assert_close(other.score_cached(other.extract(test)).image_scores, result.image_scores)

    detector.save(tmp_path / "model")
    loaded = load_detector(tmp_path / "model")
    again = loaded.score(test)
    torch.testing.assert_close(again.image_scores, result.image_scores, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(again.anomaly_maps, result.anomaly_maps, rtol=1e-6, atol=1e-7)
    assert loaded.threshold_ == pytest.approx(detector.threshold_)

    # another size is resized to the model's, as every method does
    from omniad.data.images import resize_image

    big = _images(1, size=96)
    torch.testing.assert_close(detector.score(big).image_scores, detector.score(resize_image(big, 64)).image_scores)


def test_cli_reads_uniad_options():
    from omniad.cli import build_parser, method_params

    parser, names = build_parser("fit", "uniad")
    args = parser.parse_args(["fit", "--method", "uniad", "--data", "x", "--out", "m", "--preset", "cpu",
                              "--neighbor-mask", "false", "true", "true", "--hidden-dim", "48", "--lr", "1e-4",
                              "--output-bias-init", "zero"])
    params = method_params(args, names)
    assert params["lr"] == 1e-4 and isinstance(params["lr"], float)  # YAML 1.1 alone reads "1e-4" as text
    assert params["output_bias_init"] == "zero"
    assert params["neighbor_mask"] == (False, True, True)
    assert params["hidden_dim"] == 48 and params["preset"] == "cpu"
    fit_help = parser._subparsers._group_actions[0].choices["fit"].format_help()  # "%" in a docstring is fine
    assert "top 1%)" in " ".join(fit_help.split())
