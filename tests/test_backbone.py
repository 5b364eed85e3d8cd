"""The frozen backbone: unused blocks dropped without changing a feature, and old saved states still load."""

import timm
import torch

from omniad.backbone import Backbone


def test_dropping_the_blocks_after_the_last_stage_keeps_every_feature_and_old_states_load():
    torch.manual_seed(0)
    backbone = Backbone("tf_efficientnet_lite0", (2, 3), "random")
    full = timm.create_model("tf_efficientnet_lite0", features_only=True, out_indices=(2, 3)).eval()
    assert len(backbone.model.blocks) < len(full.blocks)  # the stride-32 stages after stage 3 are gone
    # a state saved before the blocks were dropped (it carries them) loads strictly; their weights are ignored
    backbone.load_state_dict({f"model.{k}": v for k, v in full.state_dict().items()}, strict=True)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = full(backbone.normalize(images))
        got = backbone(images)
    assert len(got) == len(expected) == 2
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def test_a_vit_loads_full_model_weights_from_a_file_and_takes_other_sizes(tmp_path):
    """A user's ViT weights (a full timm state dict, keys without the extractor's "model." prefix) load into the
    features-only ViT, whose map at 64 px is the 4 x 4 grid of patch tokens of the full model's block."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    full = timm.create_model("vit_tiny_patch16_224", dynamic_img_size=True).eval()
    file = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(file))
    backbone = Backbone("vit_tiny_patch16_224", stages=(1,), weights=str(file))
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    (features,) = backbone(images)
    assert features.shape == (2, 192, 4, 4)
    with torch.no_grad():
        tokens = full.forward_intermediates(backbone.normalize(images), indices=[1], intermediates_only=True)[0]
    torch.testing.assert_close(features, tokens, rtol=1e-4, atol=1e-5)
