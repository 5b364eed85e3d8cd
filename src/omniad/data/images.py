"""Read images and masks from disk (or an upload's bytes: ``decode_image``) into [0, 1] tensors, and resize them
under the pinned protocol.

Every file problem becomes an ``ImageReadError`` that names the file and what is wrong with it. Truncated
files are errors: Pillow's ``LOAD_TRUNCATED_IMAGES`` is left off, and PNGs, which Pillow decodes without
looking at their end, are checked for a complete ``IEND`` chunk and valid chunk CRCs.

Pixel values are scaled by the range of their storage type, never by the image's own min/max, so that
intensities stay comparable between images: 8-bit / 255, 16-bit / 65535. EXIF orientation is deliberately NOT
applied, so that images stay pixel-aligned with their masks.

Draft decoding: a JPEG read at a known output size is decoded with libjpeg's own DCT scaling (Pillow's
``Image.draft``) when it is at least twice that size on both sides, then resized as always. A full decode of a
large JPEG inverse-transforms, converts and resizes every pixel only for the resize to throw most of them away;
the scaled inverse DCT skips that work: a 500 x 1263 grey kolektor JPEG read at 128 px takes 5.5 ms in full and
3.4 ms drafted, beside PaDiM's 8.9 ms of scoring (one thread, benchmarks/results/draft.md). ``draft=False`` gives
the full decode (bit-identical pre-processing); the change in scores is measured in that file too.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# Modes Pillow can turn into RGB without losing meaning (alpha is dropped, not composited: a transparent
# pixel keeps its colour, which is what inspection images with a stray alpha channel need).
_TO_RGB_MODES = {"RGB", "RGBA", "RGBX", "RGBa", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "La"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
_PNG_IEND = b"IEND\xaeB`\x82"
# Pillow's JPEG draft scales by 1/2, 1/4 or 1/8 only, to the largest reduction that keeps the decoded image at
# least the requested size on both sides: it changes nothing unless the file is at least this many times the
# output size on both sides.
DRAFT_MIN_FACTOR = 2


class ImageReadError(ValueError):
    """An image or mask file that cannot be read; the message names the file and the problem."""


class ImageTooLargeError(ImageReadError):
    """An image with more pixels than the decoding limit (Pillow's decompression-bomb limit, or a caller's)."""


_WARNINGS_LOCK = threading.Lock()


def _open(path: str | os.PathLike, size: Size | None = None, draft: bool = False
          ) -> tuple[Image.Image, tuple[int, int] | None]:
    """Open and decode ``path`` (``_decode``), turning every failure into an ``ImageReadError``."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise ImageReadError(f"{path}: broken symbolic link (its target {os.readlink(path)} does not exist)")
    if not path.exists():
        raise ImageReadError(f"{path}: file not found")
    if not path.is_file():
        raise ImageReadError(f"{path}: not a file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ImageReadError(f"{path}: cannot read file ({err})") from err
    return _decode(data, str(path), size=size, draft=draft)


def _decode(data: bytes, name: str, max_pixels: int | None = None, size: Size | None = None, draft: bool = False
            ) -> tuple[Image.Image, tuple[int, int] | None]:
    """Decode an image file's bytes (the one decoding path of files and uploads); errors name ``name``.

    Returns the image and the (height, width) it is to be resized to: ``size`` resolved against the header's size
    (None without ``size``), so that a drafted image ends at exactly the size its full decode would. With
    ``draft``, a JPEG is decoded at the largest 1/2, 1/4 or 1/8 scale that stays at least that size.
    """
    if not data:
        raise ImageReadError(f"{name}: file is empty (0 bytes)")
    try:
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; both are refused, so that a huge or
        # malicious file is an error naming it instead of a memory blow-up. catch_warnings changes process-wide
        # state, hence the lock: a server decodes uploads on several threads.
        with _WARNINGS_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageTooLargeError(
            f"{name}: image too large ({err}); raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted"
        ) from err
    except UnidentifiedImageError as err:
        raise ImageReadError(
            f"{name}: not an image Pillow can identify (wrong format or corrupt header)"
        ) from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(f"{name}: cannot open image ({err})") from err
    if max_pixels is not None and image.width * image.height > max_pixels:
        # checked on the header, before the pixels are decoded
        raise ImageTooLargeError(
            f"{name}: image too large ({image.width}x{image.height} = {image.width * image.height} pixels; "
            f"the limit is {max_pixels})"
        )
    # resolved on the header's size, before a draft changes image.size (the limits above saw the header, too)
    target = None if size is None else _size_hw(size, (image.height, image.width))
    if draft and target is not None and image.format == "JPEG":
        # the same mode: colour conversion stays _to_unit_array's; (width, height), Pillow's order
        image.draft(image.mode, (target[1], target[0]))
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(f"{name}: truncated or corrupt {image.format} image ({err})") from err
    if image.format == "PNG":
        _check_png_complete(name, data)
    if image.width == 0 or image.height == 0:
        raise ImageReadError(f"{name}: image has zero size {image.width}x{image.height}")
    return image, target


def _check_png_complete(name: str, data: bytes) -> None:
    """Pillow stops reading a PNG after its pixel data; a file cut after that point still decodes."""
    if data.rfind(_PNG_IEND) < 0:
        raise ImageReadError(f"{name}: truncated PNG (no complete IEND chunk at the end)")
    try:
        Image.open(io.BytesIO(data)).verify()
    except Exception as err:  # noqa: BLE001 - verify raises assorted types for assorted damage
        raise ImageReadError(f"{name}: corrupt PNG ({err})") from err


def _to_unit_array(image: Image.Image, path: str | Path) -> np.ndarray:
    """(H, W) or (H, W, C) float32 array in [0, 1], scaled by the storage type's range."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        return np.asarray(image).astype(np.float32) / 65535.0
    if mode == "I":
        # 32-bit integer: what older Pillow made of 16-bit PNGs, and what 16-bit TIFFs can arrive as.
        values = np.asarray(image)
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 65535:
            raise ImageReadError(
                f"{path}: 32-bit integer image with values {low}..{high}; only 0..65535 (16-bit) is supported"
            )
        return values.astype(np.float32) / 65535.0
    if mode == "F":
        values = np.asarray(image).astype(np.float32)
        if not np.isfinite(values).all():
            raise ImageReadError(f"{path}: floating-point image contains NaN or infinity")
        low, high = float(values.min()), float(values.max())
        if low < 0:
            raise ImageReadError(f"{path}: floating-point image has negative values (min {low})")
        # Float images carry no range; assume [0, 1], else the smallest integer range that holds them.
        scale = 1.0 if high <= 1.0 else 255.0 if high <= 255.0 else 65535.0 if high <= 65535.0 else None
        if scale is None:
            raise ImageReadError(f"{path}: floating-point image with values up to {high}; expected <= 65535")
        return values / scale
    if mode == "1":
        return np.asarray(image, dtype=np.float32)
    if mode == "L":
        return np.asarray(image).astype(np.float32) / 255.0
    if mode == "LA":
        return np.asarray(image)[..., 0].astype(np.float32) / 255.0
    if mode in _TO_RGB_MODES:
        return np.asarray(image.convert("RGB")).astype(np.float32) / 255.0
    raise ImageReadError(f"{path}: unsupported image mode {mode!r}")


def read_image(path: str | os.PathLike, size: Size | None = None, *, draft: bool = True,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """Read an image file as a (3, H, W) float32 tensor in [0, 1], resized to ``size`` (``resize_image``) if given.

    PNG, JPEG, BMP and TIFF; 8- and 16-bit; grayscale is replicated to 3 channels; alpha is dropped; palette,
    CMYK and other colour modes are converted to RGB. Multi-frame files yield their first frame. A grey image is
    resized before its channel is replicated: the same pixels as resizing the three copies, a third of the work.

    Args:
        path: the image file.
        size: output size (a side, an (H, W) pair or a ``KeepAspect`` rule, resolved on the file's own size);
            None keeps the file's size.
        draft: with a ``size``, decode a JPEG at a reduced scale first (Pillow's ``Image.draft``: libjpeg's DCT
            scaling), then resize as always. Pillow reduces by 1/2, 1/4 or 1/8 only, and only as far as keeps
            the image at least ``size`` on both sides, so this changes nothing unless the JPEG is at least twice
            ``size`` on both sides; other formats are never drafted. False: the full decode, bit-identical to
            ``resize_image(read_image(path), size)``.
        dtype: ``torch.float32`` (default): values in [0, 1]. ``torch.uint8``: 0-255, what an exported graph
            takes: an 8-bit file is converted and resized in 8 bits (on kolektor's 500 x 1270 JPEGs 5.2 instead of
            6.3 ms per image, one thread), each pixel within one level of the float path's value rounded; a file
            of more bits is read as floats and rounded (``to_uint8``).

    Raises:
        ImageReadError: the file is missing, empty, not an image, truncated or corrupt, or of an
            unsupported mode.
        ValueError: a ``dtype`` other than those two.
    """
    path = Path(path)
    image, target = _open(path, size, draft)
    return _as_tensor(image, path, target, dtype)


def read_image_hw(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an image file from its header, without decoding the pixels (what a tile count needs;
    a file whose pixels are broken is still refused, by name, when ``read_image`` reads it)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(f"{path}: image too large ({err})") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(f"{path}: cannot read the image's size ({err})") from err
    return int(height), int(width)


def decode_image(data: bytes, name: str = "<bytes>", *, max_pixels: int | None = None, size: Size | None = None,
                 draft: bool = True, dtype: torch.dtype = torch.float32) -> Tensor:
    """``read_image`` of a file's content already in memory (an upload): the same decoding, checks and scaling.

    Args:
        data: the bytes of an image file.
        name: what error messages call it (e.g. the uploaded file's name).
        max_pixels: refuse images with more pixels than this before decoding them (None: Pillow's
            decompression-bomb limit only, ``PIL.Image.MAX_IMAGE_PIXELS``); the file's own size counts, drafted
            or not.
        size: resize to this (as ``read_image``); None keeps the file's size.
        draft: with a ``size``, decode a large JPEG at a reduced scale first (``read_image``'s ``draft``).
        dtype: ``torch.float32`` or ``torch.uint8`` (``read_image``'s ``dtype``).

    Raises:
        ImageTooLargeError: over ``max_pixels`` or Pillow's limit (an ``ImageReadError``).
        ImageReadError: empty, not an image, truncated or corrupt, or of an unsupported mode.
    """
    image, target = _decode(bytes(data), name, max_pixels, size, draft)
    return _as_tensor(image, name, target, dtype)


def _as_tensor(image: Image.Image, name: str | Path, size: Size | None, dtype: torch.dtype) -> Tensor:
    if dtype == torch.uint8:
        array = _to_byte_array(image)
        return _rgb_tensor(array, size) if array is not None else to_uint8(
            _rgb_tensor(_to_unit_array(image, name), size))
    if dtype != torch.float32:
        raise ValueError(f"images are read as torch.float32 or torch.uint8, not {dtype}")
    return _rgb_tensor(_to_unit_array(image, name), size)


def _to_byte_array(image: Image.Image) -> np.ndarray | None:
    """(H, W) or (H, W, 3) uint8 array of an 8-bit image (as ``_to_unit_array`` reads it, times 255), None for
    images of more bits."""
    mode = image.mode
    if mode == "L":
        return np.asarray(image)
    if mode == "LA":
        return np.asarray(image)[..., 0]
    if mode == "1":
        return np.asarray(image.convert("L"))
    if mode in _TO_RGB_MODES:
        return np.asarray(image.convert("RGB"))
    return None


def to_uint8(images: Tensor) -> Tensor:
    """Images of floats in [0, 1] -> uint8 0-255, rounded (exact for images read from 8-bit files); uint8 images
    are returned as they are."""
    if images.dtype == torch.uint8:
        return images
    return (images.detach().float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def _rgb_tensor(array: np.ndarray, size: Size | None = None) -> Tensor:
    """(3, H, W) tensor of a float [0, 1] or uint8 array, resized to ``size``: a grey image is resized before its
    channel is replicated."""
    grey = array.ndim == 2
    array = np.ascontiguousarray(array[None] if grey else array.transpose(2, 0, 1))
    # Pillow's pixels are read-only, which torch warns of; the copy of 8-bit pixels is cheap beside the resize
    image = torch.from_numpy(array if array.flags.writeable else array.copy())
    if image.is_floating_point():
        image = image.float().clamp_(0.0, 1.0)
    image = image if size is None else resize_image(image, size)
    return image.repeat(3, 1, 1) if grey else image


def read_mask(path: str | os.PathLike) -> Tensor:
    """Read a ground-truth mask as an (H, W) float32 tensor of 0/1: any nonzero value (any channel) is defect.

    Raises:
        ImageReadError: as for ``read_image``.
    """
    path = Path(path)
    image, _ = _open(path)
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA" if image.mode == "PA" else "RGB")  # palette index 0 need not be black
    values = np.asarray(image)
    if values.ndim == 3:
        # Alpha is not ground truth: an opaque black mask pixel is normal.
        colour_channels = {"LA": 1, "La": 1, "RGBA": 3, "RGBa": 3}.get(image.mode, values.shape[2])
        values = values[..., :colour_channels].any(axis=2)
    return torch.from_numpy(np.ascontiguousarray(values != 0, dtype=np.float32))


@dataclass(frozen=True)
class KeepAspect:
    """A size rule: fit inside ``height`` x ``width`` keeping the image's aspect ratio (the content, unpadded)."""

    height: int
    width: int

    def size_of(self, height: int, width: int) -> tuple[int, int]:
        scale = min(self.height / height, self.width / width)
        return min(self.height, max(1, round(height * scale))), min(self.width, max(1, round(width * scale)))


# what readers and ``resize_image`` take as a size: a side (square), an exact (H, W), or a rule
Size = int | tuple[int, int] | KeepAspect


def _size_hw(size: Size, native: tuple[int, int] | None = None) -> tuple[int, int]:
    if isinstance(size, KeepAspect):
        if native is None:
            raise ValueError(f"{size} needs the image's own size")
        return size.size_of(int(native[0]), int(native[1]))
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def pad_to(images: Tensor, height: int, width: int) -> Tensor:
    """Zero-pad (..., H, W) at the bottom and right to at least ``height`` x ``width``."""
    pad_h, pad_w = max(0, height - images.shape[-2]), max(0, width - images.shape[-1])
    if pad_h == 0 and pad_w == 0:
        return images
    return F.pad(images, (0, pad_w, 0, pad_h))


def letterbox(images: Tensor, height: int, width: int) -> tuple[Tensor, tuple[int, int]]:
    """Resize (B, 3, H, W) images to fit ``height`` x ``width`` keeping their aspect ratio, and zero-pad the
    bottom / right to exactly that size. Returns the padded batch and the (h, w) of the content (top-left)."""
    content = KeepAspect(height, width).size_of(*images.shape[-2:])
    return pad_to(resize_image(images, content), height, width), content


def check_image_batch(images: Any, allow_uint8: bool = False) -> Tensor:
    """A batch for ``score``: a (B, 3, H, W) (or one (3, H, W)) float tensor in [0, 1] (or, with
    ``allow_uint8``, uint8 0-255: an exported graph's input type), else a clear error."""
    if not isinstance(images, Tensor):
        raise TypeError(f"score expects a (B, 3, H, W) float tensor, got {type(images).__name__}")
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"score expects images of shape (B, 3, H, W), got {tuple(images.shape)}")
    if allow_uint8 and images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise TypeError(f"score expects float images in [0, 1], got dtype {images.dtype}")
    if images.numel():
        low, high = float(images.min()), float(images.max())
        if not (low >= -1e-6 and high <= 1 + 1e-6):  # also catches NaN
            raise ValueError(
                f"score expects images with values in [0, 1], got values in [{low:.4g}, {high:.4g}] (images of "
                "0-255 must be divided by 255; normalisation is the detector's own)"
            )
    return images


def resize_image(image: Tensor, size: Size) -> Tensor:
    """Resize a (3, H, W) or (B, 3, H, W) image (floats in [0, 1] or uint8) to ``size`` (int: square;
    ``KeepAspect``: from its own size), bilinear, antialiased."""
    height, width = _size_hw(size, tuple(image.shape[-2:]))
    if tuple(image.shape[-2:]) == (height, width):
        return image
    batch = image if image.dim() == 4 else image[None]
    out = F.interpolate(batch, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    out = out if out.dtype == torch.uint8 else out.clamp_(0.0, 1.0)  # uint8 saturates in the kernel
    return out if image.dim() == 4 else out[0]


def resize_mask(mask: Tensor, size: Size) -> Tensor:
    """Resize an (H, W) mask like its image (bilinear, antialiased), then binarise at > 0.5 (the protocol)."""
    height, width = _size_hw(size, tuple(mask.shape[-2:]))
    if tuple(mask.shape[-2:]) == (height, width):
        return (mask > 0.5).float()
    out = F.interpolate(
        mask.float()[None, None], size=(height, width), mode="bilinear", align_corners=False, antialias=True
    )[0, 0]
    return (out > 0.5).float()
