"""Backbone: a frozen timm feature extractor that takes plain [0, 1] images and applies its own
normalisation."""

from __future__ import annotations

import os
from collections.abc import Sequence

import timm
import torch
from torch import Tensor, nn

from omniad.weights import resolve_weights


class Backbone(nn.Module):
    """Frozen multi-stage feature extractor over timm ``features_only``.

    Args:
        name: timm model name (e.g. "tf_efficientnet_lite0", "wide_resnet50_2", "mobilenetv2_100").
        stages: timm feature indices to return (0 = the stride-2 stage of most CNNs).
        weights: "auto", "timm", "offline", "random" or a file path (see ``omniad.weights.resolve_weights``).

    Attributes:
        channels: channels of each returned stage.
        strides: stride (reduction) of each returned stage.
        weights_source: where the weights came from, for reports.
    """

    def __init__(
        self,
        name: str = "tf_efficientnet_lite0",
        stages: Sequence[int] = (1, 2, 3),
        weights: str | os.PathLike = "auto",
    ):
        super().__init__()
        self.name = name
        self.stages = tuple(int(s) for s in stages)
        source, self.weights_source = resolve_weights(name, weights)
        kwargs = dict(features_only=True, out_indices=self.stages)
        if "vit" in name:  # a ViT takes any multiple of its patch size (its position embedding interpolated)
            kwargs["dynamic_img_size"] = True
        if isinstance(source, str):
            # a checkpoint from timm's hub cache: timm loads it itself, so its checkpoint filters apply;
            # source=None makes timm read the file even for a model whose config says "hf-hub".
            overlay = {"file": source, "source": None}
            self.model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        else:
            self.model = timm.create_model(name, pretrained=False, **kwargs)
            self._drop_unused_blocks()  # before loading: a weights file need not hold the blocks never run
            if source is not None:
                _load_features(self.model, source, name)
        cfg = self.model.pretrained_cfg if hasattr(self.model, "pretrained_cfg") else {}
        mean = cfg.get("mean", (0.485, 0.456, 0.406))
        std = cfg.get("std", (0.229, 0.224, 0.225))
        for key, value in (("mean", mean), ("std", std)):
            buffer = torch.tensor(value, dtype=torch.float32).view(1, 3, 1, 1)
            self.register_buffer(key, buffer, persistent=False)
        self._drop_unused_blocks()  # (the hub path: timm loaded the whole model)
        self.channels: list[int] = list(self.model.feature_info.channels())
        self.strides: list[int] = list(self.model.feature_info.reduction())
        self.model.to(memory_format=torch.channels_last)
        self.requires_grad_(False)
        self.eval()

    def _drop_unused_blocks(self) -> None:
        """timm's EfficientNet / MobileNet feature extractors run every block, also those after the last stage
        returned (lite0 with stages 2-3: two stride-32 stages for nothing). Dropping them gives the same features,
        bit for bit, 1.19-1.25x faster (lite0, 8 x 256 px, 1 thread; stages 1-3 and 2-3)."""
        blocks = getattr(self.model, "blocks", None)
        used = [int(n.split(".")[1]) for n in self.model.feature_info.module_name() if n.startswith("blocks.")]
        if isinstance(blocks, nn.Sequential) and used and max(used) + 1 < len(blocks):
            self.model.blocks = blocks[: max(used) + 1]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        # models saved before the unused blocks were dropped carry their weights: ignore those, load the rest
        kept = len(getattr(self.model, "blocks", ()))
        for key in [k for k in state_dict if k.startswith(prefix + "model.blocks.")]:
            if int(key[len(prefix + "model.blocks.") :].split(".")[0]) >= kept:
                del state_dict[key]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def train(self, mode: bool = True) -> Backbone:
        """Always stays in eval mode: the backbone is frozen (BatchNorm statistics included)."""
        return super().train(False)

    def normalize(self, images: Tensor) -> Tensor:
        """[0, 1] images -> the backbone's input normalisation."""
        return (images - self.mean) / self.std

    def forward(self, images: Tensor) -> list[Tensor]:
        """(B, 3, H, W) images in [0, 1] -> one (B, C_i, H / s_i, W / s_i) map per stage."""
        # channels-last runs the depthwise convolutions of EfficientNet/MobileNet ~1.6x faster on a CPU (measured,
        # lite0, 16 x 256 px); outputs are made contiguous again so that callers may .view() them.
        x = self.normalize(images).contiguous(memory_format=torch.channels_last)
        return [f.contiguous() for f in self.model(x)]


def vision_transformer(backbone: Backbone) -> tuple[nn.Module, int] | None:
    """(the timm ViT, index of the block whose tokens are the last returned map) when the backbone is a ViT with
    a [CLS] token, else None."""
    inner = getattr(backbone.model, "model", backbone.model)
    last = backbone.model.feature_info.module_name()[-1]
    if getattr(inner, "cls_token", None) is None or not last.startswith("blocks."):
        return None
    return inner, int(last.split(".")[1])


def _load_features(model: nn.Module, state: dict[str, Tensor], name: str) -> None:
    """Load a full-model (or features-only) state dict into a features-only model; every feature tensor must
    be present with the right shape (the classifier and head may be missing or extra)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    if missing and all(k.startswith("model.") for k in own):  # timm wraps a ViT extractor: its keys under "model."
        state = {f"model.{k}": v for k, v in state.items()}
        missing = [k for k in own if k not in state]
    if missing:
        raise ValueError(
            f"the weights given for {name!r} lack {len(missing)} of its feature tensors (first: "
            f"{missing[0]}); are they for another architecture?"
        )
    bad = [k for k in own if state[k].shape != own[k].shape]
    if bad:
        raise ValueError(
            f"the weights given for {name!r} do not fit: {bad[0]} is {tuple(state[bad[0]].shape)}, "
            f"the model needs {tuple(own[bad[0]].shape)}"
        )
    model.load_state_dict({k: state[k] for k in own}, strict=True)
