"""PatchCore's coreset searches (omniad.coreset) and the memory helpers they and the feature caches use."""

from __future__ import annotations

import os

import pytest
import torch

from omniad import create_detector
from omniad.cluster import nearest_centres
from omniad.coreset import StreamingCoreset, greedy_coreset
from omniad.memory import PeakMemory, allocate, memory_budget_bytes, peak_rss_bytes


def _clusters(n: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    """Points around 20 well-separated centres (a line of look-alike patches of several product types)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(20, dim, generator=g) * 10
    return centres[torch.randint(20, (n,), generator=g)] + torch.randn(n, dim, generator=g)


def _stream(points: torch.Tensor, search: StreamingCoreset, batch: int = 37) -> torch.Tensor:
    for start in range(0, points.shape[0], batch):
        search.add(points[start : start + batch])
    return search.finish()


def _radius(points: torch.Tensor, bank: torch.Tensor) -> float:
    return float(nearest_centres(points, bank)[0].max())


def test_one_chunk_is_the_papers_coreset():
    x = _clusters(900)
    paper = x[greedy_coreset(x, 90, projection_dim=8, seed=3)]
    chunked = _stream(x, StreamingCoreset(0.1, chunk_size=1000, projection_dim=8, seed=3))
    torch.testing.assert_close(chunked, paper, rtol=0, atol=0)


@pytest.mark.parametrize("chunk", [50, 128, 333, 5000])
def test_chunked_bank_size_is_the_ratio_of_every_patch_and_comes_from_each_chunk(chunk):
    x = _clusters(1000)
    search = StreamingCoreset(0.07, chunk_size=chunk, projection_dim=0, seed=0)
    bank = _stream(x, search)
    assert bank.shape == (round(0.07 * 1000), 16)
    # chunks of `chunk` patches; the last one takes the rest (one to two chunks' worth)
    chunks = max(1, 1000 // chunk)
    assert search.chunks == chunks
    # every bank entry is a patch; the entries a chunk contributes come from that chunk, then the reserve's
    rows = {tuple(r.tolist()): i for i, r in enumerate(x)}
    owners = [min(rows[tuple(b.tolist())] // chunk, chunks - 1) for b in bank[: sum(map(len, search.kept[:chunks]))]]
    assert owners == sorted(owners)
    assert len(search.kept) == chunks + (chunks > 1)  # one chunk: no reserve


def test_chunked_search_covers_near_the_papers_and_far_better_than_chance():
    """k-center radius (the farthest point from the bank) on 2-D clusters: measured paper 2.1, chunked 3.5 (its
    chunks each spend their share on the same clusters), a random sample 11.2."""
    x = _clusters(4000, dim=2)
    k = 80
    paper = _radius(x, x[greedy_coreset(x, k, projection_dim=0, seed=0)])
    chunked = _radius(x, _stream(x, StreamingCoreset(k / 4000, chunk_size=1000, projection_dim=0, seed=0)))
    chance = _radius(x, x[torch.randperm(4000, generator=torch.Generator().manual_seed(0))[:k]])
    assert chunked < 2.0 * paper
    assert chunked < 0.5 * chance


def test_chunked_search_holds_two_chunks_at_most():
    search = StreamingCoreset(0.1, chunk_size=100, projection_dim=0)
    x = _clusters(1000)
    for start in range(0, 1000, 30):
        search.add(x[start : start + 30])
        assert search.buffered < 2 * 100 + 30
    assert search.finish().shape[0] == 100


@pytest.mark.parametrize("ratio", [0.01, 0.3, 0.9])
def test_chunks_that_save_budget_leave_the_last_chunk_enough_to_spend_it(ratio):
    """Four copies of one set: the later copies are covered already and stop early; the bank still ends at the
    ratio, and the copies get fewer centres than the first."""
    base = _clusters(500, dim=2)
    x = torch.cat([base + 1e-3 * i for i in range(4)])
    search = StreamingCoreset(ratio, chunk_size=500, projection_dim=0, seed=0)
    bank = _stream(x, search, batch=100)
    assert bank.shape[0] == round(ratio * 2000)
    per_chunk = [part.shape[0] for part in search.kept]
    assert len(per_chunk) == 4 + (ratio <= 0.5)  # the reserve's centres come last
    if ratio < 0.5:  # the copies are covered by the first chunk's centres already
        assert max(per_chunk[1:3]) < per_chunk[0]


def test_the_reserve_goes_to_the_type_the_chunks_could_not_cover():
    """An early chunk of a diverse type, then many chunks of a plain one: the chunks cannot give the early type
    more than its share, the reserve can, and it lands there."""
    g = torch.Generator().manual_seed(0)
    diverse = torch.randn(1000, 2, generator=g) * 10
    plain = torch.randn(4000, 2, generator=g) * 0.5 + 100
    x = torch.cat([diverse, plain])
    search = StreamingCoreset(0.04, chunk_size=500, projection_dim=0, seed=0, reserve=0.5)
    bank = _stream(x, search, batch=100)
    reserve = search.kept[-1]
    assert bank.shape[0] == round(0.04 * 5000) and reserve.shape[0] > 0
    assert float((reserve[:, 0] < 50).float().mean()) > 0.9  # nearly all of it on the diverse type
    without = _stream(x, StreamingCoreset(0.04, chunk_size=500, projection_dim=0, seed=0, reserve=0.0))
    assert _radius(diverse, bank) < _radius(diverse, without)


@pytest.mark.parametrize(("kwargs", "message"), [({"ratio": 0.0}, "ratio"), ({"ratio": 1.5}, "ratio"),
                                                 ({"ratio": 0.1, "chunk_size": 0}, "chunk_size"),
                                                 ({"ratio": 0.1, "reserve": 1.0}, "reserve")])
def test_streaming_coreset_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StreamingCoreset(**kwargs)


def test_a_tiny_ratio_still_gives_at_least_one_centre():
    x = _clusters(3000)
    search = StreamingCoreset(0.0004, chunk_size=1000, projection_dim=0)  # round(1.2) = 1 centre in all
    assert _stream(x, search).shape[0] == 1


def test_streaming_coreset_refuses_an_empty_stream():
    with pytest.raises(ValueError, match="no patches"):
        StreamingCoreset(0.1).finish()


def test_patchcore_refuses_candidates_with_the_chunked_search():
    with pytest.raises(ValueError, match="coreset_candidates"):
        create_detector("patchcore", weights="random", coreset_candidates=100).prepare()
    with pytest.raises(ValueError, match="coreset must be one of"):
        create_detector("patchcore", weights="random", coreset="kmeans").prepare()


def test_patchcore_chunks_give_the_ratio_of_the_patches():
    images = torch.rand(10, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    common = dict(weights="random", image_size=32, stages=(1, 2), calibration_fraction=0.0, progress=False,
                  coreset_ratio=0.1, device="cpu")
    small = create_detector("patchcore", coreset_chunk_size=64, **common).fit(images)  # one image per chunk
    whole = create_detector("patchcore", **common).fit(images)
    paper = create_detector("patchcore", coreset="greedy", **common).fit(images)
    assert small.net_.memory_bank.shape == whole.net_.memory_bank.shape == (64, small.net_.memory_bank.shape[1])
    torch.testing.assert_close(whole.net_.memory_bank, paper.net_.memory_bank)  # one chunk: the paper's
    assert not torch.equal(small.net_.memory_bank, whole.net_.memory_bank)


# ------------------------------------------------------------------------------------------- memory
def _mapped_spill_files() -> int:
    with open("/proc/self/maps") as f:
        return sum("omniad-spill-" in line for line in f)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux's /proc")
def test_arrays_above_the_budget_are_memory_mapped(tmp_path, monkeypatch):
    monkeypatch.setenv("OMNIAD_SPILL_DIR", str(tmp_path))
    monkeypatch.setenv("OMNIAD_MEMORY_BUDGET_GB", "0.001")  # ~1 MB
    before = _mapped_spill_files()
    small = allocate((100, 10))
    assert _mapped_spill_files() == before
    big = allocate((1000, 1000))  # 4 MB
    assert _mapped_spill_files() == before + 1
    big[:] = 2.0
    small[:] = 1.0
    assert float(big.sum()) == 2e6 and list(tmp_path.iterdir()) == []  # the file is unlinked; the mapping holds
    del big
    assert _mapped_spill_files() == before


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux's /proc")
def test_a_spilled_feature_cache_trains_the_same_model(monkeypatch, tmp_path):
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    params = dict(weights="random", image_size=32, device="cpu", progress=False, calibration_fraction=0.0,
                  hidden_dim=16, num_encoder_layers=1, num_decoder_layers=1, num_heads=2, dim_feedforward=32,
                  feature_stride=8, neighbor_size=1, epochs=2, train_batch_size=4)
    in_memory = create_detector("uniad", **params).fit(images)
    monkeypatch.setenv("OMNIAD_SPILL_DIR", str(tmp_path))
    monkeypatch.setenv("OMNIAD_MEMORY_BUDGET_GB", "0")
    spilled_detector = create_detector("uniad", **params)
    cache = spilled_detector.extract(images)
    with open("/proc/self/maps") as f:
        assert any("omniad-spill-" in line for line in f)
    spilled_detector.fit_features(cache)
    torch.testing.assert_close(spilled_detector.score(images).image_scores, in_memory.score(images).image_scores)


@pytest.mark.parametrize("value", ["lots", "-1", "nan"])
def test_a_bad_memory_budget_is_refused_by_name(monkeypatch, value):
    monkeypatch.setenv("OMNIAD_MEMORY_BUDGET_GB", value)
    with pytest.raises(ValueError, match="OMNIAD_MEMORY_BUDGET_GB"):
        memory_budget_bytes()


def _resident_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux's /proc")
def test_peak_memory_sees_a_large_allocation_and_nested_blocks_keep_the_outer_peak():
    size = 256 * 2**20
    with PeakMemory() as outer:
        before = _resident_bytes()
        big = torch.ones(size // 4)  # 256 MiB, touched
        del big
        with PeakMemory() as inner:  # nested: must not reset the outer block's peak
            pass
    assert outer.bytes >= before + 0.9 * size
    assert inner.bytes == outer.bytes or inner.bytes >= before + 0.9 * size
    with PeakMemory() as later:  # a new outermost block starts a new peak
        pass
    assert later.bytes < before + 0.5 * size
    assert peak_rss_bytes() > 0


def test_fit_reports_its_peak_memory():
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    detector = create_detector("padim", weights="random", image_size=32, stages=(1,), n_features=4,
                               calibration_fraction=0.0, progress=False, device="cpu").fit(images)
    assert detector.fit_peak_memory_mb_ > 10  # a Python process with torch holds more than that
