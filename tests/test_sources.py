"""Image sources: what fit/evaluate accept, the calibration hold-out split, batching."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from omniad.data.sources import SampleBatch, as_image_dataset, iterate_batches, iterate_samples, split_holdout
from omniad.types import Sample


def _images(n: int, size: int = 8) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(n))


def _sample(i: int, size: int = 8) -> Sample:
    image = torch.full((3, size, size), i / 10)
    mask = torch.zeros(size, size)
    mask[0, 0] = float(i % 2)
    return Sample(image, mask, label=i % 2, category=f"cat{i % 3}", defect_type="good" if i % 2 == 0 else "hole",
                  path=f"/x/{i}.png", has_mask=i != 3)


class _SampleDataset(Dataset):
    def __init__(self, n):
        self.items = [_sample(i) for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_as_image_dataset_from_a_batch_tensor():
    x = _images(4)
    ds = as_image_dataset(x)
    assert len(ds) == 4
    for i in range(4):
        assert torch.equal(ds[i], x[i])


def test_as_image_dataset_from_list_of_tensors_and_samples_strips_metadata():
    x = _images(3)
    ds = as_image_dataset(list(x))
    assert len(ds) == 3 and torch.equal(ds[2], x[2])
    samples = _SampleDataset(5)
    ds = as_image_dataset(samples)
    assert len(ds) == 5
    item = ds[4]
    assert isinstance(item, torch.Tensor) and torch.equal(item, samples[4].image)
    ds = as_image_dataset([_sample(1), _sample(2)])
    assert torch.equal(ds[1], _sample(2).image)
    assert as_image_dataset(ds) is ds  # idempotent


@pytest.mark.parametrize("bad", [torch.rand(3, 8, 8), torch.rand(2, 1, 8, 8), torch.rand(8, 8)])
def test_as_image_dataset_rejects_wrong_tensor_shapes(bad):
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        as_image_dataset(bad)


@pytest.mark.parametrize("bad", [42, {"a": 1}, "/data/bottle/train", None])
def test_as_image_dataset_rejects_non_image_sources(bad):
    with pytest.raises(TypeError, match="cannot read images"):
        as_image_dataset(bad)


def test_bad_items_are_named_by_index():
    ds = as_image_dataset([torch.rand(3, 8, 8), torch.rand(1, 8, 8), "x"])
    with pytest.raises(ValueError, match=r"item 1 .*\(1, 8, 8\)"):
        ds[1]
    with pytest.raises(ValueError, match="item 2 .*str"):
        ds[2]


def test_split_holdout_sizes_disjoint_and_deterministic():
    ds = as_image_dataset(_images(20))
    train, hold = split_holdout(ds, 0.25, seed=3)
    assert len(train) == 15 and len(hold) == 5
    t_idx, h_idx = set(train.indices), set(hold.indices)
    assert not t_idx & h_idx and t_idx | h_idx == set(range(20))
    train2, hold2 = split_holdout(ds, 0.25, seed=3)
    assert train2.indices == train.indices and hold2.indices == hold.indices
    _, hold3 = split_holdout(ds, 0.25, seed=4)
    assert hold3.indices != hold.indices  # the seed matters (C(20, 5) choices: a clash is negligible)


def test_split_holdout_none_when_nothing_or_everything_would_be_held_out():
    ds = as_image_dataset(_images(3))
    assert split_holdout(ds, 0.0, 0) == (ds, None)
    assert split_holdout(ds, 0.1, 0) == (ds, None)  # round(0.3) = 0 images
    one = as_image_dataset(_images(1))
    assert split_holdout(one, 0.9, 0) == (one, None)  # would leave nothing to train on


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 2.0])
def test_split_holdout_rejects_invalid_fraction(fraction):
    with pytest.raises(ValueError, match="fraction"):
        split_holdout(as_image_dataset(_images(4)), fraction, 0)


def test_iterate_batches_keeps_order_and_sizes():
    x = _images(7)
    batches = list(iterate_batches(x, batch_size=3))
    assert [b.shape[0] for b in batches] == [3, 3, 1]
    assert torch.equal(torch.cat(batches), x)
    batches = list(iterate_batches(_SampleDataset(5), batch_size=2))
    assert torch.equal(torch.cat(batches)[:, 0, 0, 0], torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4]))


def test_iterate_batches_rejects_a_labelled_tensor_dataset_item():
    # TensorDataset items are tuples (image, label): not an image tensor, so it must fail loudly
    ds = TensorDataset(_images(2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="item 0"):
        list(iterate_batches(ds, batch_size=2))


def test_sample_batch_stacks_and_keeps_metadata():
    samples = [_sample(i) for i in range(4)]
    batch = SampleBatch(samples)
    assert len(batch) == 4
    assert batch.images.shape == (4, 3, 8, 8) and batch.masks.shape == (4, 8, 8)
    assert batch.labels.tolist() == [0, 1, 0, 1] and batch.labels.dtype == torch.long
    assert batch.has_mask.tolist() == [True, True, True, False]
    assert batch.categories == ["cat0", "cat1", "cat2", "cat0"]
    assert batch.defect_types == ["good", "hole", "good", "hole"]
    assert batch.paths == [f"/x/{i}.png" for i in range(4)]
    assert torch.equal(batch.masks[1], samples[1].mask)


def test_iterate_samples_in_order():
    batches = list(iterate_samples(_SampleDataset(5), batch_size=2))
    assert [len(b) for b in batches] == [2, 2, 1]
    assert [p for b in batches for p in b.paths] == [f"/x/{i}.png" for i in range(5)]
