"""Image readers, the synthetic multi-type generator and evaluation protocols."""

from omniad.data.images import (
    ImageReadError,
    ImageTooLargeError,
    KeepAspect,
    decode_image,
    read_image,
    read_mask,
    resize_image,
    resize_mask,
)
from omniad.data.mvtec import MVTecDataset, SampleRecord, SkippedFile, list_categories
from omniad.data.synthetic import SYNTHETIC_CATEGORIES, make_synthetic_dataset

__all__ = [
    "ImageReadError",
    "ImageTooLargeError",
    "KeepAspect",
    "MVTecDataset",
    "SYNTHETIC_CATEGORIES",
    "SampleRecord",
    "SkippedFile",
    "decode_image",
    "list_categories",
    "make_synthetic_dataset",
    "read_image",
    "read_mask",
    "resize_image",
    "resize_mask",
]
