"""mkd (masked knowledge distillation + DEFEND): Sinkhorn, masking, the student's blindness to hidden patches,
DEFEND's reach into the teacher, save/load of the tuned teacher, parameter checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from omniad import create_detector, load_detector
from omniad.methods.mkd.defend import crop_resize, last_blocks, random_boxes, sinkhorn_knopp
from omniad.methods.mkd.masking import guided_mask, num_masked, random_mask, spatial_attention
from omniad.methods.mkd.network import MaskedStudent
from omniad.postprocess import image_score

TINY = dict(weights="random", image_size=32, batch_size=8, device="cpu", progress=False, seed=0, preset="cpu",
            embed_dim=16, depth=1, num_heads=2, epochs=1, train_batch_size=4, head_hidden=16, head_dim=8,
            min_steps=0, stages=(2,), calibration_fraction=0.0)


def _images(n: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_sinkhorn_gives_doubly_stochastic_assignments():
    scores = F.normalize(torch.randn(300, 6), dim=1) @ F.normalize(torch.randn(6, 6), dim=1).T
    q = sinkhorn_knopp(scores, epsilon=0.05, iterations=200)
    assert (q >= 0).all()
    torch.testing.assert_close(q.sum(1), torch.ones(300), rtol=0, atol=1e-5)  # each sample: one unit of mass
    torch.testing.assert_close(q.sum(0), torch.full((6,), 300 / 6), rtol=1e-3, atol=0)  # equipartition
    # the assignment follows the scores: each sample's largest share goes to one of its best-scored prototypes
    best = scores.argmax(1)
    assert (q.argmax(1) == best).float().mean() > 0.5


def test_the_student_never_sees_masked_patches():
    torch.manual_seed(0)
    net = MaskedStudent(32, 8, 12, embed_dim=16, depth=2, num_heads=2).eval()
    x = torch.randn(2, 3, 32, 32)
    mask = random_mask(2, net.num_patches, 0.5, torch.Generator().manual_seed(0))
    pixel_mask = mask.view(2, 1, 4, 1, 4, 1).expand(2, 3, 4, 8, 4, 8).reshape(2, 3, 32, 32)
    changed = torch.where(pixel_mask, torch.randn_like(x) * 10, x)
    with torch.no_grad():
        before, after = net(x, mask), net(changed, mask)
        torch.testing.assert_close(after, before, rtol=0, atol=0)
        # not vacuous: the same change with nothing hidden changes the output
        assert not torch.allclose(net(x), net(changed))


def test_masks_hide_the_requested_share():
    attention = torch.rand(5, 16)
    for ratio, hidden in ((0.5, 8), (0.25, 4), (0.0, 0), (0.97, 15)):
        assert num_masked(16, ratio) == hidden
        assert (guided_mask(attention, ratio).sum(1) == hidden).all()
        assert (random_mask(5, 16, ratio, torch.Generator().manual_seed(0)).sum(1) == hidden).all()
    with pytest.raises(ValueError, match="mask ratio"):
        num_masked(16, 1.0)


def test_guided_masking_hides_the_patches_of_highest_teacher_attention():
    features = torch.randn(3, 7, 4, 4)
    attention = spatial_attention(features)
    torch.testing.assert_close(attention, features.pow(2).mean(1).flatten(1))
    mask = guided_mask(attention, 0.5)
    for row in range(3):
        assert attention[row][mask[row]].min() > attention[row][~mask[row]].max()


def test_crops_resample_the_box_they_name():
    image = torch.arange(64.0).view(1, 1, 8, 8)
    box = torch.tensor([[0.0, -1.0, 1.0, 0.0]])  # the top-right quarter
    torch.testing.assert_close(crop_resize(image, box, (4, 4)), image[..., :4, 4:])
    boxes = random_boxes(100, (0.05, 0.25), torch.Generator().manual_seed(0))
    area = ((boxes[:, 2] - boxes[:, 0]) / 2) ** 2
    assert (boxes >= -1).all() and (boxes <= 1 + 1e-6).all()
    assert (area >= 0.05 - 1e-6).all() and (area <= 0.25 + 1e-6).all()


def test_defend_changes_only_the_teachers_last_two_blocks():
    det = create_detector("mkd", **TINY, defend=True, defend_epochs=2, defend_lr=1e-2, head_lr=1e-2)
    det.prepare()
    tuned = {id(p) for block in last_blocks(det.backbone_.model, 2) for p in block.parameters()}
    names_tuned = {n for n, p in det.backbone_.named_parameters() if id(p) in tuned}
    before = {k: v.clone() for k, v in det.backbone_.state_dict().items()}
    det.fine_tune_teacher(_images())
    after = det.backbone_.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "DEFEND changed nothing"
    assert changed <= names_tuned, f"DEFEND changed tensors outside its blocks: {sorted(changed - names_tuned)}"
    assert not any(p.requires_grad for p in det.backbone_.parameters())  # frozen again for distillation


def test_save_and_load_keep_the_defended_teacher(tmp_path):
    images = _images(12)
    det = create_detector("mkd", **TINY, defend=True, defend_lr=1e-2).fit(images)
    pretrained = create_detector("mkd", **TINY).prepare().backbone_.state_dict()
    tuned = det.backbone_.state_dict()
    assert any(not torch.equal(tuned[k], pretrained[k]) for k in tuned)
    det.save(tmp_path / "m")
    loaded = load_detector(tmp_path / "m")
    for key, value in tuned.items():
        torch.testing.assert_close(loaded.backbone_.state_dict()[key], value, rtol=0, atol=0)
    torch.testing.assert_close(loaded.score(images).image_scores, det.score(images).image_scores)
    # a second fit starts again from the pretrained teacher: the same model
    torch.testing.assert_close(det.fit(images).score(images).image_scores, loaded.score(images).image_scores)


def test_prototypes_default_to_twice_the_normal_classes():
    assert create_detector("mkd", **TINY).prepare().resolved_.n_prototypes == 2
    assert create_detector("mkd", **TINY, n_normal_classes=5).prepare().resolved_.n_prototypes == 10
    assert create_detector("mkd", **TINY, n_normal_classes=5, n_prototypes=3).prepare().resolved_.n_prototypes == 3


def test_min_steps_adds_epochs_on_a_small_set_only():
    # 8 images in batches of 4: 2 steps an epoch
    floor = create_detector("mkd", **{**TINY, "epochs": 1, "min_steps": 5}).fit(_images(8))
    assert floor.distil_epochs_ == 3 and len(floor.loss_history_) == 6  # ceil(5 / 2) epochs, whole epochs
    paper = create_detector("mkd", **{**TINY, "epochs": 4, "min_steps": 5}).fit(_images(8))
    assert paper.distil_epochs_ == 4 and len(paper.loss_history_) == 8  # already past the floor
    assert create_detector("mkd", weights="random", preset="cpu").prepare().resolved_.min_steps == 500
    assert create_detector("mkd", weights="random", preset="paper").prepare().resolved_.min_steps is None


@pytest.mark.parametrize("bad", [dict(mask_ratio=1.0), dict(mask_ratio=-0.1), dict(masking="attention"),
                                 dict(n_prototypes=1), dict(min_steps=-1), dict(crop_scale=(0.5, 0.2)),
                                 dict(temperature=0.0),
                                 dict(stages=(2, 3)), dict(defend_lr=0.0)])
def test_out_of_range_parameters_are_refused(bad):
    with pytest.raises(ValueError):
        create_detector("mkd", **{**TINY, **bad}).prepare()


def test_an_image_size_off_the_teachers_grid_is_refused():
    with pytest.raises(ValueError, match="multiple of the teacher's stride"):
        create_detector("mkd", **{**TINY, "image_size": 36}).fit(_images(4, 36))


def test_too_many_blocks_to_tune_are_refused():
    with pytest.raises(ValueError, match="only"):
        create_detector("mkd", **TINY, defend=True, defend_blocks=500).fit(_images(4))


def test_mean_pooling_is_the_maps_mean():
    maps = torch.rand(3, 5, 5)
    torch.testing.assert_close(image_score(maps, "mean"), maps.mean((1, 2)))


def test_reports_state_the_teacher_substitution():
    from omniad.metrics.evaluate import describe_detector

    det = create_detector("mkd", **TINY, defend=True).fit(_images(8))
    backbone = describe_detector(det)["backbone"]
    assert backbone.startswith("tf_efficientnet_lite0") and "in place of the paper's" in backbone
    assert "fine-tuned by DEFEND" in backbone and "fine-tuned by DEFEND" in det.meta()["teacher"]


# A randomly initialised timm ViT teacher: 2 of vit_tiny's blocks kept (stages=(1,): the map of block 1), 4 x 4
# patch tokens at 64 px (the position embedding interpolated).
VIT = dict(TINY, backbone="vit_tiny_patch16_224", stages=(1,), image_size=64)


def _reference_cls_attention(vit, block, images_normalised):
    """timm's own attention matrix (its unfused path: the softmax goes through ``attn_drop``), [CLS] row, patch
    columns, mean over heads."""
    attention = vit.blocks[block].attn
    seen = []
    handle = attention.attn_drop.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    fused, attention.fused_attn = attention.fused_attn, False
    try:
        vit.forward_features(images_normalised)
    finally:
        attention.fused_attn = fused
        handle.remove()
    return seen[0][:, :, 0, vit.num_prefix_tokens :].mean(dim=1)


def test_a_vit_teachers_mask_is_guided_by_its_cls_attention():
    from omniad.backbone import vision_transformer

    det = create_detector("mkd", **VIT).prepare()
    vit, block = vision_transformer(det.backbone_)
    assert block == 1
    images = _images(4, 64)
    targets, attention = det.teacher_targets(images)
    assert targets.shape == (4, 192, 4, 4) and attention.shape == (4, 16)
    expected = _reference_cls_attention(vit, block, det.backbone_.normalize(images))
    torch.testing.assert_close(attention, expected, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(attention, spatial_attention(targets) / spatial_attention(targets).sum(1, keepdim=True))
    torch.testing.assert_close(attention.sum(1) <= 1.0 + 1e-6, torch.ones(4, dtype=torch.bool))
    # a CNN teacher keeps its spatial attention
    cnn = create_detector("mkd", **TINY).prepare()
    cnn_targets, cnn_attention = cnn.teacher_targets(_images(4))
    torch.testing.assert_close(cnn_attention, spatial_attention(cnn_targets))


def test_defend_fine_tunes_a_vit_teachers_last_blocks_on_its_patch_tokens(tmp_path):
    det = create_detector("mkd", **VIT, defend=True, defend_lr=1e-2, head_lr=1e-2)
    det.prepare()
    blocks = last_blocks(det.backbone_.model, 2)
    tuned = {id(p) for block in blocks for p in block.parameters()}
    names_tuned = {n for n, p in det.backbone_.named_parameters() if id(p) in tuned}
    assert names_tuned and all(".blocks." in n for n in names_tuned)
    images = _images(8, 64)
    before = {k: v.clone() for k, v in det.backbone_.state_dict().items()}
    det.fine_tune_teacher(images)
    after = det.backbone_.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= names_tuned
    det.fit(images)
    assert "ViT teacher" in det.meta()["teacher"]
    det.save(tmp_path / "m")
    torch.testing.assert_close(load_detector(tmp_path / "m").score(images).image_scores, det.score(images).image_scores)
