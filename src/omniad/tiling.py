"""Tiled inspection: cut an image into overlapping square tiles, and stitch the tiles' anomaly maps back into a
map of the image's own size, overlaps averaged.

Tiles start every ``stride`` pixels along each axis and the last one is moved back to end at the image's edge,
so every pixel is covered and no tile hangs over the edge. An image whose shorter side is below the tile is first
up-sampled, aspect kept, until that side fills a tile (``tiling_size``), and its stitched map is resized back to
the image's size: a small image gets the network's whole input, as the square squash would give it, rather than
a corner of a zero-padded tile. (Measured on magnetic tiles of 100-500 px: benchmarks/results/tiling.md.)
The base detector (``omniad.methods.base``) uses these for every method: each tile is a training image, and
``score`` stitches the tile maps of each image before smoothing and pooling.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import Dataset

from omniad.data.images import pad_to, resize_image


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of the tiles along an axis of ``length`` pixels: every ``stride``, the last at the edge."""
    if tile < 1 or stride < 1:
        raise ValueError(f"tile and stride must be positive, got {tile} and {stride}")
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def tiling_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """The size an image is tiled at: its own, or up-sampled (aspect kept) until its shorter side is ``tile``."""
    short = min(height, width)
    if short >= tile:
        return height, width
    scale = tile / short
    return max(tile, round(height * scale)), max(tile, round(width * scale))


def tile_boxes(height: int, width: int, tile: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners (y, x) of the tiles of a ``height`` x ``width`` image, row by row."""
    return [(y, x) for y in tile_starts(height, tile, stride) for x in tile_starts(width, tile, stride)]


def cut_tiles(image: Tensor, boxes: list[tuple[int, int]], tile: int) -> Tensor:
    """(n, C, tile, tile) tiles of a (C, H, W) image at ``boxes`` (padded to the tile when it is smaller)."""
    padded = pad_to(image, tile, tile)
    return torch.stack([padded[:, y : y + tile, x : x + tile] for y, x in boxes])


class Stitcher:
    """Accumulates tile maps into one (H, W) map of an image: the mean of every tile covering each pixel."""

    def __init__(self, height: int, width: int, tile: int, device: torch.device | str = "cpu") -> None:
        self.height, self.width, self.tile = height, width, tile
        full = (max(height, tile), max(width, tile))
        self.total = torch.zeros(full, dtype=torch.float32, device=device)
        self.count = torch.zeros(full, dtype=torch.float32, device=device)

    def add(self, maps: Tensor, boxes: list[tuple[int, int]]) -> None:
        """Add (n, tile, tile) maps of the tiles at ``boxes``."""
        if maps.shape[0] != len(boxes) or tuple(maps.shape[-2:]) != (self.tile, self.tile):
            raise ValueError(f"expected {len(boxes)} maps of {self.tile}x{self.tile}, got {tuple(maps.shape)}")
        for tile_map, (y, x) in zip(maps, boxes, strict=True):
            self.total[y : y + self.tile, x : x + self.tile] += tile_map.float()
            self.count[y : y + self.tile, x : x + self.tile] += 1.0

    def result(self) -> Tensor:
        """The (H, W) stitched map; every pixel must have been covered."""
        count = self.count[: self.height, : self.width]
        if not bool((count > 0).all()):
            raise RuntimeError("stitching: some pixels are covered by no tile")
        return self.total[: self.height, : self.width] / count


class TileDataset(Dataset):
    """Every tile of every image of a dataset of (3, H, W) tensors, each a training image of its own (tiles of
    images of any size; each image's tile count is found when the dataset is built: from the file's header where
    the dataset tells sizes (``image_hw``), else by reading the image).

    Images are read in order, and the last one read is kept, so a sequential pass reads each image once. Images
    smaller than a tile are up-sampled first (``tiling_size``)."""

    def __init__(self, images: Dataset, tile: int, stride: int) -> None:
        self.images, self.tile, self.stride = images, tile, stride
        self.index: list[tuple[int, int, int]] = []  # (image, y, x)
        size_of = getattr(images, "image_hw", None)
        for i in range(len(images)):
            hw = size_of(i) if size_of is not None else None
            if hw is None:
                hw = tuple(int(n) for n in images[i].shape[-2:])
            height, width = tiling_size(*hw, tile)
            self.index += [(i, y, x) for y, x in tile_boxes(height, width, tile, stride)]
        self._last: tuple[int, Tensor] | None = None

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> Tensor:
        i, y, x = self.index[k]
        if self._last is None or self._last[0] != i:
            self._last = (i, to_tiling_size(self.images[i], self.tile))
        return self._last[1][:, y : y + self.tile, x : x + self.tile]


def to_tiling_size(image: Tensor, tile: int) -> Tensor:
    """A (C, H, W) image resized to ``tiling_size`` (itself when no side is below the tile)."""
    size = tiling_size(*(int(n) for n in image.shape[-2:]), tile)
    return image if tuple(image.shape[-2:]) == size else resize_image(image, size)


def box_batches(boxes: list[tuple[int, int]], batch_size: int) -> Iterator[list[tuple[int, int]]]:
    """``boxes`` in runs of at most ``batch_size``: the tiles scored at once (what bounds the memory)."""
    for start in range(0, len(boxes), batch_size):
        yield boxes[start : start + batch_size]


__all__ = ["Stitcher", "TileDataset", "box_batches", "cut_tiles", "pad_to", "tile_boxes", "tile_starts",
           "tiling_size", "to_tiling_size"]
