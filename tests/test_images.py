"""read_image / read_mask: every format and mode to the right values; every broken file to a clear error."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from omniad.data import ImageReadError, ImageTooLargeError, decode_image, read_image, read_mask
from omniad.data.images import resize_image, resize_mask

RNG = np.random.default_rng(0)
RGB8 = RNG.integers(0, 256, (12, 10, 3), dtype=np.uint8)
GRAY8 = RNG.integers(0, 256, (12, 10), dtype=np.uint8)
GRAY16 = RNG.integers(0, 65536, (12, 10)).astype(np.uint16)


def _chw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.astype(np.float32)).permute(2, 0, 1)


@pytest.mark.parametrize("ext", ["png", "bmp", "tif", "tiff"])
def test_lossless_rgb_exact(tmp_path, ext):
    path = tmp_path / f"a.{ext}"
    Image.fromarray(RGB8).save(path)
    image = read_image(path)
    assert image.dtype == torch.float32 and image.shape == (3, 12, 10)
    assert torch.equal(image, _chw(RGB8) / 255.0)


@pytest.mark.parametrize("ext", ["jpg", "jpeg", "JPG"])
def test_jpeg_close_to_source(tmp_path, ext):
    flat = np.zeros((16, 16, 3), dtype=np.uint8) + np.array([200, 40, 90], dtype=np.uint8)
    path = tmp_path / f"a.{ext}"
    Image.fromarray(flat).save(path, format="JPEG", quality=95)
    image = read_image(path)
    assert image.shape == (3, 16, 16)
    assert torch.allclose(image, _chw(flat) / 255.0, atol=4 / 255)


@pytest.mark.parametrize("ext", ["png", "jpg", "bmp", "tif"])
def test_grayscale_replicated_to_three_equal_channels(tmp_path, ext):
    path = tmp_path / f"g.{ext}"
    Image.fromarray(GRAY8).save(path)
    image = read_image(path)
    assert image.shape == (3, 12, 10)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    if ext != "jpg":
        assert torch.equal(image[0], torch.from_numpy(GRAY8.astype(np.float32)) / 255.0)


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_16bit_grayscale_scaled_by_65535(tmp_path, ext):
    path = tmp_path / f"g16.{ext}"
    Image.fromarray(GRAY16).save(path)
    assert Image.open(path).mode.startswith("I;16")
    image = read_image(path)
    expected = torch.from_numpy(GRAY16.astype(np.float32)) / 65535.0
    assert torch.allclose(image[0], expected, atol=1e-7) and torch.equal(image[0], image[2])


def test_16bit_big_endian_tiff(tmp_path):
    path = tmp_path / "g16b.tif"
    Image.frombytes("I;16B", (10, 12), GRAY16.astype(">u2").tobytes()).save(path)
    assert Image.open(path).mode == "I;16B"
    expected = torch.from_numpy(GRAY16.astype(np.float32)) / 65535.0
    assert torch.allclose(read_image(path)[1], expected, atol=1e-7)


def test_32bit_integer_and_float_tiffs(tmp_path):
    Image.fromarray(GRAY16.astype(np.int32)).save(tmp_path / "i.tif")
    assert Image.open(tmp_path / "i.tif").mode == "I"
    expected = torch.from_numpy(GRAY16.astype(np.float32)) / 65535.0
    assert torch.allclose(read_image(tmp_path / "i.tif")[0], expected, atol=1e-6)

    unit = RNG.random((12, 10)).astype(np.float32)
    Image.fromarray(unit).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    assert torch.allclose(read_image(tmp_path / "f.tif")[0], torch.from_numpy(unit))


def test_alpha_dropped_not_composited(tmp_path):
    rgba = np.concatenate([RGB8, np.zeros((12, 10, 1), dtype=np.uint8)], axis=2)  # fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert torch.equal(read_image(tmp_path / "a.png"), _chw(RGB8) / 255.0)

    la = np.stack([GRAY8, np.full_like(GRAY8, 7)], axis=2)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    image = read_image(tmp_path / "la.png")
    assert torch.equal(image[2], torch.from_numpy(GRAY8.astype(np.float32)) / 255.0)


def test_palette_and_bilevel_and_cmyk(tmp_path):
    palette = Image.new("P", (4, 3))
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 128, 255] + [0] * 759)
    palette.putdata([0, 1, 2, 1] * 3)
    palette.save(tmp_path / "p.png")
    image = read_image(tmp_path / "p.png")
    assert torch.allclose(image[:, 0, 1], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(image[:, 0, 2], torch.tensor([0.0, 128 / 255, 1.0]))

    Image.fromarray(GRAY8 > 128).save(tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").mode == "1"
    assert torch.equal(read_image(tmp_path / "b.png")[0], torch.from_numpy((GRAY8 > 128).astype(np.float32)))

    Image.new("CMYK", (8, 8), (0, 255, 0, 0)).save(tmp_path / "c.jpg")  # full magenta ink
    image = read_image(tmp_path / "c.jpg")
    assert torch.allclose(image[:, 4, 4], torch.tensor([1.0, 0.0, 1.0]), atol=3 / 255)


def test_mask_any_nonzero_is_defect(tmp_path):
    values = np.array([[0, 1, 255], [0, 128, 0]], dtype=np.uint8)
    expected = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    Image.fromarray(values).save(tmp_path / "m.png")
    Image.fromarray(values.astype(np.uint16) * 257).save(tmp_path / "m16.png")
    zeros = np.zeros_like(values)
    Image.fromarray(np.stack([zeros, zeros, values], axis=2)).save(tmp_path / "c.bmp")
    rgba = np.stack([np.zeros_like(values)] * 3 + [np.full_like(values, 255)], axis=2)
    rgba[..., 1] = values
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")  # opaque alpha is not a defect
    for name in ["m.png", "m16.png", "c.bmp", "a.png"]:
        mask = read_mask(tmp_path / name)
        assert mask.dtype == torch.float32 and torch.equal(mask, expected), name


@pytest.mark.parametrize(
    ("ext", "cut", "needle"),
    [
        ("jpg", 2, "truncated"),  # only the end-of-image marker is missing
        ("jpg", -0.5, "truncated"),
        ("png", 2, "truncated"),  # cut inside the IEND chunk: Pillow alone decodes this happily
        ("png", 12, "truncated"),  # IEND missing
        ("png", -0.5, "truncated"),
        ("bmp", 50, "truncated"),
        ("tif", 50, "truncated"),
    ],
)
def test_truncated_files_raise(tmp_path, ext, cut, needle):
    path = tmp_path / f"t.{ext}"
    Image.fromarray(RGB8).resize((64, 64)).save(path)
    data = path.read_bytes()
    keep = len(data) - cut if cut >= 1 else int(len(data) * -cut)
    path.write_bytes(data[:keep])
    with pytest.raises(ImageReadError, match=needle) as info:
        read_image(path)
    assert str(path) in str(info.value)
    with pytest.raises(ImageReadError):
        read_mask(path)


def test_corrupt_png_crc_raises(tmp_path):
    path = tmp_path / "crc.png"
    Image.fromarray(RGB8).save(path)
    data = bytearray(path.read_bytes())
    idat = data.find(b"IDAT")
    data[idat + 10] ^= 0xFF  # damage compressed pixel data: the chunk CRC no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(ImageReadError, match="crc.png"):
        read_image(path)


def test_error_cases_name_file_and_problem(tmp_path):
    cases = {
        tmp_path / "missing.png": "not found",
        tmp_path / "empty.png": "empty",
        tmp_path / "text.png": "not an image",
        tmp_path / "folder.png": "not a file",
        tmp_path / "negative.tif": "0..65535",
    }
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("this is not a picture")
    (tmp_path / "folder.png").mkdir()
    Image.fromarray(np.array([[-5, 3]], dtype=np.int32)).save(tmp_path / "negative.tif")
    for path, problem in cases.items():
        with pytest.raises(ImageReadError) as info:
            read_image(path)
        assert str(path) in str(info.value) and problem in str(info.value), str(info.value)
        assert isinstance(info.value, ValueError)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels (Pillow reads the size before any pixel)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("ext", ["png", "jpg", "tif"])
def test_decode_image_is_read_image_on_bytes(tmp_path, ext):
    path = tmp_path / f"a.{ext}"
    Image.fromarray(RGB8).save(path)
    assert torch.equal(decode_image(path.read_bytes(), "a"), read_image(path))


def test_decode_image_errors_name_the_upload():
    for data, problem in ((b"", "empty"), (b"not a picture", "not an image"), (png_header_only(4, 4)[:-12], "PNG")):
        with pytest.raises(ImageReadError) as info:
            decode_image(data, "upload.png")
        assert str(info.value).startswith("upload.png: ") and problem in str(info.value), str(info.value)


def test_decode_image_refuses_too_many_pixels_before_decoding():
    data = png_header_only(30000, 30000)  # 9e8 pixels: over twice Pillow's decompression-bomb limit
    with pytest.raises(ImageTooLargeError, match="big.png: image too large"):
        decode_image(data, "big.png")
    small = Image.fromarray(RGB8)
    buffer = io.BytesIO()
    small.save(buffer, format="PNG")
    with pytest.raises(ImageTooLargeError, match="10x12 = 120 pixels; the limit is 100"):
        decode_image(buffer.getvalue(), "x.png", max_pixels=100)
    assert decode_image(buffer.getvalue(), "x.png", max_pixels=120).shape == (3, 12, 10)
    assert issubclass(ImageTooLargeError, ImageReadError)


def test_resize_image_shapes_and_range():
    image = torch.rand(3, 40, 30)
    out = resize_image(image, 16)
    assert out.shape == (3, 16, 16) and out.min() >= 0 and out.max() <= 1
    assert resize_image(image, (20, 10)).shape == (3, 20, 10)
    assert resize_image(image[None], 8).shape == (1, 3, 8, 8)
    assert resize_image(image, (40, 30)) is image
    flat = torch.full((3, 40, 30), 0.3)
    assert torch.allclose(resize_image(flat, 16), flat[:, :16, :16], atol=1e-6)


def test_resize_mask_binarised_after_resize():
    mask = torch.zeros(64, 64)
    mask[8:40, 8:40] = 1.0  # a block survives
    mask[50, :] = 1.0  # a 1-px line averages to 1/4 under 4x downscaling: dropped by the > 0.5 rule
    out = resize_mask(mask, 16)
    assert out.shape == (16, 16)
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    assert out[2:10, 2:10].all() and out[12:14].sum() == 0
    upsampled = resize_mask(torch.tensor([[0.0, 1.0], [0.0, 0.0]]), 8)
    assert set(upsampled.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(resize_mask(torch.tensor([[0.0, 0.7]]), (1, 2)), torch.tensor([[0.0, 1.0]]))


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_read_image_with_a_size_is_reading_then_resizing(tmp_path, mode):
    """``read_image(path, size)`` resizes a grey image before replicating its channel: the pixels must be those of
    resizing the three copies."""
    pixels = np.random.default_rng(0).integers(0, 256, (37, 53, 3) if mode == "RGB" else (37, 53), dtype=np.uint8)
    path = tmp_path / "image.png"
    Image.fromarray(pixels, mode).save(path)
    for size in (16, (20, 31), 53):
        got = read_image(path, size)
        assert torch.equal(got, resize_image(read_image(path), size))
        if mode == "L":
            assert torch.equal(got[0], got[1]) and torch.equal(got[0], got[2])


def test_read_image_hw_reads_the_header_and_names_a_bad_file(tmp_path):
    from omniad.data.images import read_image_hw

    Image.fromarray(np.zeros((21, 34, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    assert read_image_hw(tmp_path / "a.png") == (21, 34) == tuple(read_image(tmp_path / "a.png").shape[-2:])
    (tmp_path / "b.png").write_bytes(b"not an image")
    with pytest.raises(ImageReadError, match="b.png: cannot read the image's size"):
        read_image_hw(tmp_path / "b.png")


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "P", "1", "I;16"])
def test_uint8_reading_is_the_float_reading_rounded(tmp_path, mode):
    from omniad.data.images import to_uint8

    pixels = RNG.integers(0, 256, (40, 52, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert("L" if mode in ("1", "I;16") else mode)
    if mode == "I;16":
        image = Image.fromarray(GRAY16)
    elif mode == "1":
        image = image.convert("1")
    path = tmp_path / f"{mode.replace(';', '')}.{'tif' if mode == 'I;16' else 'png'}"
    image.save(path)
    as_floats, as_bytes = read_image(path), read_image(path, dtype=torch.uint8)
    assert as_bytes.dtype == torch.uint8 and as_bytes.shape == as_floats.shape
    assert torch.equal(as_bytes, to_uint8(as_floats))  # unresized: the same pixels exactly
    resized = read_image(path, (16, 20), dtype=torch.uint8)  # resized in 8 bits: within a level of the floats
    assert resized.shape == (3, 16, 20)
    assert (resized.int() - to_uint8(read_image(path, (16, 20))).int()).abs().max() <= 1


def test_reading_as_another_dtype_is_refused(tmp_path):
    Image.fromarray(GRAY16.astype(np.uint8)).save(tmp_path / "g.png")
    with pytest.raises(ValueError, match=r"torch.float32 or torch.uint8, not torch.float64"):
        read_image(tmp_path / "g.png", dtype=torch.float64)
