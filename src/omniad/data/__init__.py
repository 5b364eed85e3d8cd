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
from omniad.data.labelled import LabelledImages, read_class_folders, read_coco, read_idx, read_labelled
from omniad.data.mvtec import MVTecDataset, SampleRecord, SkippedFile, list_categories
from omniad.data.novelty import (
    NoveltyProtocol,
    NoveltySetting,
    leave_one_out,
    load_protocol,
    multi_class,
    multi_object,
    uni_class,
)
from omniad.data.synthetic import SYNTHETIC_CATEGORIES, make_synthetic_dataset

__all__ = [
    "ImageReadError",
    "ImageTooLargeError",
    "KeepAspect",
    "LabelledImages",
    "MVTecDataset",
    "NoveltyProtocol",
    "NoveltySetting",
    "SYNTHETIC_CATEGORIES",
    "SampleRecord",
    "SkippedFile",
    "decode_image",
    "leave_one_out",
    "list_categories",
    "load_protocol",
    "make_synthetic_dataset",
    "multi_class",
    "multi_object",
    "read_class_folders",
    "read_coco",
    "read_idx",
    "read_image",
    "read_labelled",
    "read_mask",
    "resize_image",
    "resize_mask",
    "uni_class",
]
