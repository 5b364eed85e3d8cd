"""ReContrast: hard-mining ramp and down-weighting, the two-encoder network, frozen/eval-mode encoders, fitting,
save/load."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from omniad import create_detector, load_detector
from omniad.backbone import Backbone
from omniad.methods.recontrast.network import (
    RecontrastNet,
    easy_point_weights,
    global_cosine_hm,
    hard_mining_alpha,
    recontrast_loss,
    scale_gradient,
)

TINY = dict(preset="cpu", iterations=5, weights="random", image_size=32, batch_size=8, device="cpu", progress=False)


def test_hard_mining_alpha_ramps_over_the_first_tenth():
    total = 1000
    assert hard_mining_alpha(0, total) == -3.0
    assert hard_mining_alpha(50, total) == pytest.approx(-1.0)  # half-way through the 100-iteration ramp
    assert hard_mining_alpha(100, total) == 1.0 and hard_mining_alpha(999, total) == 1.0
    ramp = [hard_mining_alpha(i, total) for i in range(0, 120, 10)]
    assert ramp == sorted(ramp)


def test_scale_gradient_keeps_values_and_scales_gradients():
    x = torch.randn(2, 3, requires_grad=True)
    w = torch.tensor([[0.0], [0.5]])
    y = scale_gradient(x, w)
    torch.testing.assert_close(y, x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, w.expand(2, 3))


def _one_hard_point():
    """Target and reconstruction over 10 locations: 9 reconstructed exactly (distance 0), one orthogonal (1)."""
    target = torch.zeros(1, 2, 1, 10)
    target[:, 0] = 1
    recon = target.clone() + 0.01 * torch.randn(1, 2, 1, 10, generator=torch.Generator().manual_seed(0))
    recon[0, :, 0, 3] = torch.tensor([0.0, 1.0])
    return target, recon


def test_easy_points_are_down_weighted_only_once_alpha_is_up():
    target, recon = _one_hard_point()
    weights = easy_point_weights(target, recon, alpha=1.0, factor=0.0)
    assert weights.shape == (1, 1, 1, 10)
    assert weights[0, 0, 0, 3] == 1 and weights.sum() == 1  # mean + 1 std lies between the easy and the hard
    assert easy_point_weights(target, recon, alpha=-3.0).sum() == 10  # mean - 3 std: nothing is easy


def test_hard_mining_loss_value_is_the_plain_global_cosine_and_gradients_skip_easy_points():
    target, recon = _one_hard_point()
    plain = (1 - F.cosine_similarity(target.flatten(1), recon.flatten(1))).mean()
    recon_hm = recon.clone().requires_grad_(True)
    loss = global_cosine_hm([target], [recon_hm], alpha=1.0, factor=0.0)
    assert loss.item() == pytest.approx(plain.item(), abs=1e-6) and loss.item() > 0
    loss.backward()
    grad = recon_hm.grad[0].abs().sum(dim=0)[0]  # (10,) per-location gradient size
    assert grad[3] > 0 and torch.count_nonzero(grad) == 1
    recon_half = recon.clone().requires_grad_(True)
    global_cosine_hm([target], [recon_half], alpha=1.0, factor=0.5).backward()
    recon_plain = recon.clone().requires_grad_(True)
    global_cosine_hm([target], [recon_plain], alpha=-3.0).backward()  # no down-weighting at all
    easy = torch.arange(10) != 3
    torch.testing.assert_close(recon_half.grad[..., easy], 0.5 * recon_plain.grad[..., easy])
    torch.testing.assert_close(recon_half.grad[..., 3], recon_plain.grad[..., 3])


def test_recontrast_loss_is_zero_for_perfect_reconstructions():
    maps = [torch.randn(2, 4, 3, 3) for _ in range(4)]
    assert recontrast_loss(maps, [m.clone() for m in maps], alpha=1.0).item() == pytest.approx(0, abs=1e-6)


def test_network_rebuilds_each_encoder_from_the_other():
    backbone = Backbone("tf_efficientnet_lite0", (1, 2, 3), weights="random")
    encoder = Backbone("tf_efficientnet_lite0", (1, 2, 3), weights="random")
    net = RecontrastNet(encoder, backbone.channels, backbone.strides, bottleneck_blocks=1, decoder_blocks=(1, 1, 1))
    images = torch.rand(2, 3, 32, 32)
    frozen = backbone(images)
    net.eval()
    with torch.no_grad():
        targets, recons = net(images, frozen)
    assert len(targets) == len(recons) == 6
    assert all(t is f for t, f in zip(targets[:3], frozen, strict=True))
    assert [t.shape for t in targets] == [r.shape for r in recons]
    net.train()
    assert net.decoder.training and not net.encoder.training
    assert not any(m.training for m in net.encoder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))


@pytest.fixture(scope="module")
def images():
    return torch.rand(10, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    torch.manual_seed(3)
    model = Backbone("tf_efficientnet_lite0", (1, 2, 3), weights="random").model
    path = tmp_path_factory.mktemp("weights") / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, {k: v.clone() for k, v in model.state_dict().items()}


def test_fit_trains_the_encoder_copy_only_with_frozen_batchnorm(images, weights_file, tmp_path):
    path, initial = weights_file
    detector = create_detector("recontrast", **{**TINY, "weights": str(path)}).fit(images)
    assert detector.loss_history_[-1] < detector.loss_history_[0]
    frozen = detector.backbone_.model.state_dict()
    assert all(torch.equal(frozen[k], initial[k]) for k in initial)  # the frozen encoder never changes
    trained = detector.net_.encoder.model.state_dict()
    stats = [k for k in initial if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(trained[k], initial[k]) for k in stats)  # BatchNorm in eval mode
    moved = [k for k in initial if not torch.equal(trained[k], initial[k])]
    assert moved and not any(k.startswith(("conv_stem", "bn1", "blocks.0", "blocks.1.")) for k in moved)
    assert any(k.startswith("blocks.4") for k in moved)  # cpu preset: stages after the first one train

    scores = detector.score(images[:4])
    assert scores.anomaly_maps.shape == (4, 32, 32)
    detector.save(tmp_path / "rc")
    again = load_detector(tmp_path / "rc").score(images[:4])
    torch.testing.assert_close(again.image_scores, scores.image_scores)
    torch.testing.assert_close(again.anomaly_maps, scores.anomaly_maps)


def test_paper_preset_trains_the_whole_encoder_with_amsgrad_and_decay():
    paper = create_detector("recontrast").resolved_params()
    assert paper["encoder_frozen_stages"] == 0 and paper["amsgrad"] and paper["encoder_lr"] == 1e-5
    schedule = ("iterations", "train_batch_size", "lr_decay_at", "lr_decay")
    assert tuple(paper[k] for k in schedule) == (5000, 16, 0.8, 0.2)
    assert create_detector("recontrast", preset="cpu").resolved_params()["encoder_frozen_stages"] == 1


def test_the_frozen_encoder_runs_once_per_training_image(monkeypatch):
    from omniad.methods.recontrast import Recontrast

    seen: list[int] = []
    original = Recontrast.features

    def counting(self, images):
        seen.append(images.shape[0])
        return original(self, images)

    monkeypatch.setattr(Recontrast, "features", counting)
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    detector = create_detector("recontrast", weights="random", image_size=32, batch_size=4, device="cpu",
                               progress=False, preset="cpu", iterations=5, train_batch_size=2,
                               calibration_fraction=0.0).fit(images)
    assert sum(seen) == 6  # 5 steps of 2 draw 10 images, but the frozen branch ran once per image
    assert len(detector.loss_history_) == 5
