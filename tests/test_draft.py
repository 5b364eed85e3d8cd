"""Draft decoding: a JPEG at least twice the output size is decoded at a reduced scale (Pillow's ``Image.draft``)
before the usual resize; everything else, and ``draft=False``, is the full decode, bit-identical to before."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import omniad
from omniad.data import MVTecDataset, decode_image, read_image
from omniad.data.images import ImageTooLargeError, KeepAspect, read_mask, resize_image, resize_mask
from omniad.data.labelled import read_class_folders
from omniad.serve.service import prepare_upload

SIZE = 64  # the tiny detector's input side


def _picture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth colour gradient with noise: JPEG-like content whose downscales are easy to compare."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width * 200 + 20, y / height * 180 + 30, (x + y) / (width + height) * 150 + 50], -1)
    noisy = base + np.random.default_rng(seed).normal(0, 8, base.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _jpeg(path: Path, height: int = 768, width: int = 1024, grey: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = _picture(height, width)
    Image.fromarray(pixels[..., 0] if grey else pixels).save(path, quality=95)
    return path


def _unit(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image.convert("RGB")).astype(np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory) -> Path:
    return _jpeg(tmp_path_factory.mktemp("draft") / "big.jpg")


def test_a_big_jpeg_is_decoded_at_half_scale_then_resized(big_jpeg):
    with Image.open(big_jpeg) as image:
        image.draft(image.mode, (256, 256))  # 1024 x 768 for 256: 768 // 256 = 3, so 1/2
        image.load()
        assert image.size == (512, 384)
        expected = resize_image(_unit(image), 256)
    drafted = read_image(big_jpeg, 256)
    assert torch.equal(drafted, expected)
    full = read_image(big_jpeg, 256, draft=False)
    assert drafted.shape == full.shape == (3, 256, 256)
    assert not torch.equal(drafted, full)
    # measured on this picture: mean 0.36 / 255, largest 2.1 / 255
    difference = (drafted - full).abs()
    assert float(difference.mean()) < 1 / 255
    assert float(difference.max()) < 4 / 255


def test_draft_off_is_the_old_full_decode(big_jpeg):
    for size in (256, 64, (200, 300), KeepAspect(128, 128)):
        assert torch.equal(read_image(big_jpeg, size, draft=False), resize_image(read_image(big_jpeg), size))


def test_a_jpeg_under_twice_the_size_is_not_drafted(tmp_path):
    path = _jpeg(tmp_path / "small.jpg", 500, 400)  # 400 < 2 x 256
    assert torch.equal(read_image(path, 256), read_image(path, 256, draft=False))


def test_a_png_is_never_drafted(tmp_path):
    path = tmp_path / "big.png"
    Image.fromarray(_picture(768, 1024)).save(path)
    assert torch.equal(read_image(path, 128), read_image(path, 128, draft=False))


def test_keep_aspect_ends_at_the_full_decode_s_size(tmp_path):
    # 1023 x 300 fits 100 x 100 as 100 x 29; it drafts at 1/8 to a rounded-up 128 x 38, which would fit as 100 x 30:
    # the size is resolved on the header, so that the image stays the size of its mask
    path = _jpeg(tmp_path / "odd.jpg", 300, 1023)
    rule = KeepAspect(100, 100)
    assert rule.size_of(300, 1023) == (29, 100) and rule.size_of(38, 128) == (30, 100)
    drafted, full = read_image(path, rule), read_image(path, rule, draft=False)
    assert drafted.shape == full.shape == (3, 29, 100)
    assert float((drafted - full).abs().mean()) < 1 / 255


def test_a_grey_jpeg_stays_grey(tmp_path):
    path = _jpeg(tmp_path / "grey.jpg", grey=True)
    drafted = read_image(path, 128)
    assert drafted.shape == (3, 128, 128)
    assert torch.equal(drafted[0], drafted[1]) and torch.equal(drafted[0], drafted[2])
    assert float((drafted - read_image(path, 128, draft=False)).abs().mean()) < 1 / 255


def test_uploads_are_drafted_as_files_and_limits_see_the_header(big_jpeg):
    data = big_jpeg.read_bytes()
    assert torch.equal(decode_image(data, "up.jpg", size=128), read_image(big_jpeg, 128))
    assert torch.equal(decode_image(data, "up.jpg", size=128, draft=False), read_image(big_jpeg, 128, draft=False))
    with pytest.raises(ImageTooLargeError, match="1024x768"):
        decode_image(data, "up.jpg", max_pixels=1024 * 768 - 1, size=128)


def _mvtec_with_big_jpeg(root: Path) -> tuple[Path, Path]:
    """One category: two normal training images, one defective test JPEG (1024 x 768) with its full-size mask."""
    category = root / "part"
    for k in range(2):
        _jpeg(category / "train" / "good" / f"{k:03d}.jpg")
    image = _jpeg(category / "test" / "crack" / "000.jpg")
    mask = np.zeros((768, 1024), np.uint8)
    mask[300:420, 500:700] = 255
    mask_path = category / "ground_truth" / "crack" / "000_mask.png"
    mask_path.parent.mkdir(parents=True)
    Image.fromarray(mask).save(mask_path)
    return image, mask_path


def test_mvtec_drafts_the_image_and_reads_the_mask_at_full_size(tmp_path):
    image_path, mask_path = _mvtec_with_big_jpeg(tmp_path)
    sample = MVTecDataset(tmp_path, split="test", image_size=128)[0]
    assert torch.equal(sample.image, read_image(image_path, 128))
    assert torch.equal(sample.mask, resize_mask(read_mask(mask_path), 128))
    assert sample.mask.shape == (128, 128) and 0 < int(sample.mask.sum()) < 128 * 128
    old = MVTecDataset(tmp_path, split="test", image_size=128, draft=False)[0]
    assert torch.equal(old.image, resize_image(read_image(image_path), 128))
    assert torch.equal(old.mask, sample.mask)
    rule = KeepAspect(96, 96)
    aspect = MVTecDataset(tmp_path, split="test", image_size=rule)[0]
    assert aspect.image.shape[-2:] == aspect.mask.shape == rule.size_of(768, 1024)


def test_mvtec_compares_the_mask_to_the_image_s_own_size(tmp_path):
    _, mask_path = _mvtec_with_big_jpeg(tmp_path)
    Image.fromarray(np.zeros((384, 512), np.uint8)).save(mask_path)  # the drafted size, not the file's
    with pytest.raises(ValueError, match=r"000_mask\.png is 512x384 .* is 1024x768"):
        MVTecDataset(tmp_path, split="test", image_size=128)[0]


def test_class_folders_draft_unless_told_not_to(tmp_path):
    path = _jpeg(tmp_path / "train" / "cat" / "000.jpg")
    assert torch.equal(read_class_folders(tmp_path, image_size=128)[0], read_image(path, 128))
    assert torch.equal(read_class_folders(tmp_path, image_size=128, draft=False)[0],
                       resize_image(read_image(path), 128))


@pytest.fixture(scope="module")
def detector(synthetic_root):
    model = omniad.create_detector("padim", weights="random", image_size=SIZE, batch_size=8, device="cpu",
                                   progress=False, n_features=10)
    return model.fit(MVTecDataset(synthetic_root, categories="weave", split="train", image_size=SIZE))


def test_predict_draft_changes_nothing_for_small_images(detector, synthetic_root):
    folder = synthetic_root / "weave" / "test"  # 64 px PNGs
    drafted, full = omniad.predict(detector, folder, draft=True), omniad.predict(detector, folder, draft=False)
    assert drafted.results == full.results


def test_predict_passes_draft_to_the_reader(detector, tmp_path):
    paths = [_jpeg(tmp_path / f"{k}.jpg", 300 + 40 * k, 400) for k in range(3)]  # 300-380 x 400: drafted at 64

    def own(draft: bool) -> np.ndarray:
        batch = torch.stack([read_image(p, SIZE, draft=draft) for p in paths])
        return detector.score(batch).image_scores.double().numpy()

    for draft in (True, False):
        assert np.array_equal(omniad.predict(detector, paths, draft=draft).scores, own(draft))
    assert not np.array_equal(own(True), own(False))


def test_the_service_drafts_uploads_as_predict_reads_files(detector, big_jpeg):
    data = big_jpeg.read_bytes()
    assert torch.equal(prepare_upload(detector, data, "up.jpg"), read_image(big_jpeg, SIZE))
    assert torch.equal(prepare_upload(detector, data, "up.jpg", draft=False),
                       detector.preprocess(read_image(big_jpeg))[0])
    buffer = io.BytesIO()
    Image.open(big_jpeg).save(buffer, format="PNG")
    assert torch.equal(prepare_upload(detector, buffer.getvalue(), "up.png"),
                       prepare_upload(detector, buffer.getvalue(), "up.png", draft=False))


@pytest.mark.parametrize("flag, draft", [([], True), (["--no-draft"], False)])
def test_omniad_predict_drafts_unless_told_not_to(padim_bundle, tmp_path, flag, draft):
    import json

    from omniad.cli import main

    paths = [_jpeg(tmp_path / "in" / f"{k}.jpg", 300 + 40 * k, 400) for k in range(2)]  # drafted at 64 px
    out = tmp_path / "out"
    assert main(["predict", "--model", str(padim_bundle), str(tmp_path / "in"), "--out", str(out), "--runtime",
                 "torch", "--no-overlays", *flag]) == 0
    written = {Path(r["path"]).name: r["score"] for r in json.loads((out / "results.json").read_text())["results"]}
    expected = omniad.predict(omniad.load_model(padim_bundle), paths, draft=draft)
    assert [written[p.name] for p in paths] == pytest.approx(expected.scores.tolist(), rel=1e-6)
    other = omniad.predict(omniad.load_model(padim_bundle), paths, draft=not draft)
    assert [written[p.name] for p in paths] != pytest.approx(other.scores.tolist(), rel=1e-6)
