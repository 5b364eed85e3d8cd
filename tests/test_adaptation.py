"""A new product type without retraining: few-shot adaptation (adapt_prototypes), recalibration from k normal
images, the zero-shot mutual scorer, and the CLI commands that wrap them (omniad calibrate / adapt)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omniad import create_detector, load_detector
from omniad.adaptation import adapt, check_far_resolvable, read_normals, recalibrate
from omniad.cli import main
from omniad.data import MVTecDataset
from omniad.registry import detector_class

SIZE = 64
COMMON = dict(weights="random", image_size=SIZE, batch_size=8, device="cpu", progress=False, seed=0)
SEEN, UNSEEN = ["weave", "granite"], "washer"


def _make(name: str, **overrides):
    return create_detector(name, **{**COMMON, **detector_class(name).test_params, **overrides})


@pytest.fixture(scope="module")
def data(synthetic_root):
    train = MVTecDataset(synthetic_root, categories=SEEN, split="train", image_size=SIZE)
    new = MVTecDataset(synthetic_root, categories=[UNSEEN], split="train", image_size=SIZE)
    normals = torch.stack([new[i].image for i in range(len(new))])
    test = MVTecDataset(synthetic_root, categories=[UNSEEN], split="test", image_size=SIZE)
    return train, normals, torch.stack([test[i].image for i in range(len(test))])


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_pmad_adaptation_adds_prototypes_and_leaves_the_network_tokenizer_and_backbone_alone(data):
    train, normals, test = data
    detector = _make("pmad").fit(train)
    frozen = {name: _tensors(m) for name, m in
              (("net", detector.net_), ("tokenizer", detector.tokenizer_), ("backbone", detector.backbone_))}
    old = detector.prototypes_.codebook.clone()
    before = detector.score(test).image_scores
    assert detector.adapt_prototypes(normals[:4]) is detector
    for name, module in (("net", detector.net_), ("tokenizer", detector.tokenizer_),
                         ("backbone", detector.backbone_)):
        after = module.state_dict()
        assert all(torch.equal(after[k], v) for k, v in frozen[name].items()), f"{name} changed"
    codes = detector.prototypes_.codebook
    assert codes.shape[0] > old.shape[0] and torch.equal(codes[: old.shape[0]], old)  # the seen types' stay
    assert detector.calibration_ is None  # the scores moved: the old threshold is not kept
    assert not torch.allclose(detector.score(test).image_scores, before)


def test_patchcore_adaptation_adds_every_patch_of_the_new_images_to_the_bank(data, tmp_path):
    train, normals, _ = data
    detector = _make("patchcore").fit(train)
    bank = detector.net_.memory_bank.clone()
    backbone = _tensors(detector.backbone_)
    detector.adapt_prototypes(normals[:2])
    grid = detector.features(normals[:1]).shape[-2:]
    assert detector.net_.memory_bank.shape[0] == bank.shape[0] + 2 * grid[0] * grid[1]
    assert torch.equal(detector.net_.memory_bank[: bank.shape[0]], bank)
    assert all(torch.equal(detector.backbone_.state_dict()[k], v) for k, v in backbone.items())
    # the new patches are normal references: the new type's normal images now score ~0 where they were far
    assert detector.score(normals[:2]).image_scores.max() < 1e-3
    detector.save(tmp_path / "m")
    assert load_detector(tmp_path / "m").net_.memory_bank.shape == detector.net_.memory_bank.shape


def test_a_method_without_normal_references_says_it_cannot_adapt(data):
    detector = _make("padim").fit(data[0])
    with pytest.raises(NotImplementedError, match="padim has no normal references"):
        detector.adapt_prototypes(data[1][:2])


def test_recalibration_from_k_normals_sets_the_threshold_at_the_target_rate_on_them(data):
    train, normals, _ = data
    detector = _make("patchcore").fit(train)
    scores = detector.score(normals).image_scores.numpy()
    k = len(normals)
    for far in (0.25, 0.5):
        calibration = recalibrate(detector, normals, far, "test")
        assert detector.calibration_ is calibration
        assert int(detector.decide(scores).sum()) == int(far * k)  # exactly that share of the k flagged
    recalibrate(detector, normals, 0.0)
    assert not detector.decide(scores).any() and detector.threshold_ == pytest.approx(scores.max())


def test_the_threshold_after_adapting_scores_each_normal_with_the_model_adapted_on_the_others(data, tmp_path):
    train, normals, _ = data
    _make("patchcore").fit(train).save(tmp_path / "m")
    shots = normals[:3]
    expected = []
    for i in range(3):  # by hand: a fresh copy adapted on the other two scores the third
        copy = load_detector(tmp_path / "m").adapt_prototypes(torch.cat([shots[:i], shots[i + 1:]]))
        expected.append(float(copy.score(shots[i : i + 1]).image_scores))
    detector = adapt(load_detector(tmp_path / "m"), shots, target_far=0.0)
    assert detector.threshold_ == pytest.approx(max(expected), rel=1e-5)
    assert detector.threshold_ > 10 * float(detector.score(shots).image_scores.max())  # not its own references
    all_three = load_detector(tmp_path / "m").adapt_prototypes(shots)
    assert torch.equal(detector.net_.memory_bank, all_three.net_.memory_bank)  # adapted on all k in the end


def test_k_too_small_for_the_target_rate_is_refused_clearly():
    with pytest.raises(ValueError, match=r"4 normal images cannot set a threshold at false-alarm rate 0.01.*100"):
        check_far_resolvable(4, 0.01)
    with pytest.raises(ValueError, match="at least one normal image"):
        check_far_resolvable(0, 0.0)
    check_far_resolvable(4, 0.25)
    check_far_resolvable(4, 0.0)


def test_the_zero_shot_score_of_an_image_does_not_depend_on_the_batch_order_or_size(data):
    _, normals, test = data
    batch = torch.cat([normals[:4], test])
    detector = _make("musc", calibration_fraction=0.25).fit(normals)  # learns nothing: sets up, calibrates
    scores = detector.score(batch)
    perm = torch.from_numpy(np.random.default_rng(0).permutation(len(batch)))
    permuted = detector.score(batch[perm])
    torch.testing.assert_close(permuted.image_scores, scores.image_scores[perm], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(permuted.anomaly_maps, scores.anomaly_maps[perm], rtol=1e-5, atol=1e-5)
    # extracted in chunks of 3, scored in one mutual pass: the same scores
    small_batches = _make("musc", batch_size=3, calibration_fraction=0.0).fit(normals).score(batch)
    torch.testing.assert_close(small_batches.image_scores, scores.image_scores, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="at least 2 images, got 1"):
        detector.score(batch[:1])
    with pytest.raises(ValueError, match="at least 2, got 1"):
        _make("musc").fit(normals)  # 10% of 8 images: one held-out image has nothing to be compared with


@pytest.fixture()
def saved(data, tmp_path, synthetic_root):
    model = tmp_path / "model"
    _make("patchcore").fit(data[0]).save(model)
    return model, synthetic_root / UNSEEN / "train" / "good"


def test_cli_calibrate_writes_a_threshold_set_on_the_new_types_normals(saved, tmp_path, capsys):
    model, normals_dir = saved
    original = (model / "config.json").read_bytes()
    assert main(["calibrate", "--model", str(model), "--normals", str(normals_dir), "--target-far", "0.25",
                 "--out", str(tmp_path / "m2")]) == 0
    assert (model / "config.json").read_bytes() == original  # --out given: the saved model is untouched
    recalibrated = load_detector(tmp_path / "m2")
    normals, files = read_normals(normals_dir, SIZE)
    flagged = recalibrated.decide(recalibrated.score(normals).image_scores)
    assert int(flagged.sum()) == int(0.25 * len(files))
    assert str(normals_dir) in recalibrated.calibration_.source
    assert "before:" in capsys.readouterr().out


def test_cli_adapt_then_the_model_has_the_new_references_and_a_threshold(saved, tmp_path):
    model, normals_dir = saved
    bank = load_detector(model).net_.memory_bank.shape[0]
    assert main(["adapt", "--model", str(model), "--normals", str(normals_dir), "--out", str(tmp_path / "m2"),
                 "--target-far", "0"]) == 0
    adapted = load_detector(tmp_path / "m2")
    assert adapted.net_.memory_bank.shape[0] > bank
    assert adapted.calibration_.target_far == 0.0 and "adapted on the others" in adapted.calibration_.source


def test_cli_refuses_an_empty_normals_folder_and_a_rate_k_cannot_resolve(saved, tmp_path, capsys):
    model, normals_dir = saved
    original = (model / "config.json").read_bytes()
    (tmp_path / "empty").mkdir()
    assert main(["calibrate", "--model", str(model), "--normals", str(tmp_path / "empty")]) == 2
    assert "holds no image files" in capsys.readouterr().err
    assert main(["calibrate", "--model", str(model), "--normals", str(normals_dir), "--target-far", "0.01"]) == 2
    assert "cannot set a threshold at false-alarm rate 0.01" in capsys.readouterr().err
    assert main(["calibrate", "--model", str(model), "--normals", str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert (model / "config.json").read_bytes() == original  # a refused calibration never touches the model


def test_predict_scores_a_folder_with_the_zero_shot_method_in_one_mutual_call(data, synthetic_root, tmp_path):
    from omniad.prediction import predict

    folder = synthetic_root / UNSEEN / "test"
    detector = _make("musc", calibration_fraction=0.25, batch_size=3).fit(data[1])
    result = predict(detector, [folder], tmp_path / "out", overlays=False)  # 8 images: not in chunks of 3
    images, _ = read_normals(folder, SIZE)
    np.testing.assert_allclose(result.scores, detector.score(images).image_scores.numpy(), rtol=1e-5)


def test_read_normals_says_which_entries_it_did_not_use(saved, tmp_path):
    _, normals_dir = saved
    (normals_dir / "readme.txt").write_text("not an image")
    with pytest.warns(UserWarning, match="readme.txt"):
        images, files = read_normals(normals_dir, SIZE)
    assert len(files) == images.shape[0] and all(f.suffix != ".txt" for f in files)
