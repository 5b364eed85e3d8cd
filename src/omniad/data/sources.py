"""Turn whatever a user hands to ``fit``/``evaluate`` into plain image datasets, and batch them.

``fit`` must never see labels or categories, so ``as_image_dataset`` strips everything but the image.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from omniad.types import Sample


class ImagesOnly(Dataset):
    """View of a dataset of ``Sample`` (or of tensors) that yields the (3, H, W) image tensor alone, resized to
    ``image_size`` when one is given (the same resize as the readers and ``BaseDetector.preprocess``)."""

    def __init__(self, data: Any, image_size: Any = None) -> None:
        self.data = data
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.data)

    def image_hw(self, index: int) -> tuple[int, int] | None:
        """(height, width) of image ``index`` without decoding it, where the source can tell (a dataset with
        ``image_hw``, e.g. ``MVTecDataset`` at the files' size); else None."""
        hw = getattr(self.data, "image_hw", None)
        return hw(index) if hw is not None and self.image_size is None else None

    def __getitem__(self, index: int) -> Tensor:
        item = self.data[index]
        image = item.image if isinstance(item, Sample) else item
        if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3:
            shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise ValueError(f"training item {index} is not a (3, H, W) image tensor: {shape}")
        if self.image_size is not None:
            from omniad.data.images import resize_image

            image = resize_image(image, self.image_size)
        return image


def as_image_dataset(data: Any, image_size: Any = None) -> Dataset:
    """A dataset of (3, H, W) tensors from a (N, 3, H, W) tensor, a sequence of tensors or of ``Sample``, resized
    to ``image_size`` when given (a side, an (H, W) or a size rule of ``omniad.data.images``)."""
    if isinstance(data, ImagesOnly) and image_size in (None, data.image_size):
        return data
    inner = data.dataset if isinstance(data, Subset) else None
    if isinstance(inner, ImagesOnly) and image_size in (None, inner.image_size):
        return data
    if isinstance(data, Tensor):
        if data.dim() != 4 or data.shape[1] != 3:
            raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(data.shape)}")
        return ImagesOnly(list(data.unbind(0)), image_size)
    if isinstance(data, (str, bytes)):  # a str is a Sequence: catch a folder path passed by mistake
        raise TypeError(f"cannot read images from the string {data!r}; for a folder use omniad.data.MVTecDataset")
    if isinstance(data, (Dataset, Sequence)):
        return ImagesOnly(data, image_size)
    raise TypeError(f"cannot read images from a {type(data).__name__}; pass a dataset, a list or a tensor")


def holdout_size(n: int, fraction: float) -> int:
    """How many of ``n`` images a held-out share ``fraction`` takes: round(fraction x n), or 0 when that is none
    or would leave nothing to train on."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the held-out fraction must be in [0, 1), got {fraction}")
    n_hold = int(round(fraction * n))
    return n_hold if fraction > 0 and 1 <= n_hold < n else 0


def split_holdout(images: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """Split off a seeded random share ``fraction`` of the images (None when too few to hold any out)."""
    n = len(images)
    n_hold = holdout_size(n, fraction)
    if not n_hold:
        return images, None
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(images, sorted(order[n_hold:])), Subset(images, sorted(order[:n_hold]))


def iterate_batches(
    data: Any, batch_size: int, progress: bool = False, desc: str = "", num_workers: int = 0
) -> Iterator[Tensor]:
    """Yield (B, 3, H, W) image batches from any image source, with an optional tqdm bar (a batch of images of
    several sizes comes as several batches, one per run of one size)."""
    dataset = as_image_dataset(data)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_same_size)
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc=desc, unit="batch", leave=False)
    for runs in loader:
        yield from (torch.stack(run) for run in runs)


def _same_size(items: list[Any]) -> list[list[Any]]:
    """A batch split into runs of consecutive items whose images have one size (images of different sizes, e.g.
    read at their own resolution for tiling, cannot be stacked; one size: one run, the whole batch)."""
    runs: list[list[Any]] = []
    for item in items:
        shape = (item.image if isinstance(item, Sample) else item).shape
        last = runs[-1][-1] if runs else None
        if last is not None and (last.image if isinstance(last, Sample) else last).shape == shape:
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs


class SampleBatch:
    """A batch of ``Sample``: stacked tensors plus per-sample metadata lists (for evaluation code only)."""

    def __init__(self, samples: list[Sample]) -> None:
        self.images = torch.stack([s.image for s in samples])
        self.masks = torch.stack([s.mask for s in samples])
        self.labels = torch.tensor([s.label for s in samples], dtype=torch.long)
        self.has_mask = torch.tensor([s.has_mask for s in samples], dtype=torch.bool)
        self.categories = [s.category for s in samples]
        self.defect_types = [s.defect_type for s in samples]
        self.paths = [s.path for s in samples]

    def __len__(self) -> int:
        return len(self.paths)


def iterate_samples(
    dataset: Any, batch_size: int, progress: bool = False, desc: str = "", num_workers: int = 0
) -> Iterator[SampleBatch]:
    """Yield ``SampleBatch`` objects from a dataset of ``Sample``, with an optional tqdm bar."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_same_size)
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc=desc, unit="batch", leave=False)
    for runs in loader:
        yield from (SampleBatch(run) for run in runs)
