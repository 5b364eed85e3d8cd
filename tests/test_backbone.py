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
