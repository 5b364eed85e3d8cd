"""PatchCore: the coreset search, nearest-neighbour distances, patch aggregation, bank size, defect ranking."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from omniad import create_detector
from omniad.cluster import nearest_centres
from omniad.methods.patchcore import aggregate_patches, greedy_coreset


def _naive_greedy(x: torch.Tensor, n_select: int, first: int) -> list[int]:
    """Textbook k-center greedy: repeatedly add the point farthest from the chosen set."""
    chosen = [first]
    while len(chosen) < n_select:
        d = torch.cdist(x.double(), x[chosen].double()).min(dim=1).values
        chosen.append(int(d.argmax()))
    return chosen


def _coverage(x: torch.Tensor, index) -> float:
    """Max over points of the distance to the nearest selected point (what k-center minimises)."""
    return float(torch.cdist(x, x[index]).min(dim=1).values.max())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_coreset_equals_naive_reference_without_projection(seed):
    x = torch.randn(200, 6, generator=torch.Generator().manual_seed(10 + seed))
    index = greedy_coreset(x, 25, projection_dim=0, seed=seed)
    first = int(torch.randint(200, (1,), generator=torch.Generator().manual_seed(seed)))
    assert index.tolist() == _naive_greedy(x, 25, first)
    assert len(set(index.tolist())) == 25
    # projection_dim >= dim also means no projection
    assert greedy_coreset(x, 25, projection_dim=6, seed=seed).tolist() == index.tolist()


@pytest.mark.parametrize("projection_dim", [0, 16])
def test_greedy_coreset_covers_better_than_random(projection_dim):
    """One big cluster and many small far ones: random picks mostly miss the small ones, k-center does not."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(15, 32, generator=g) * 10
    big = torch.randn(500, 32, generator=g) * 0.5
    small = (centres[:, None, :] + 0.1 * torch.randn(15, 3, 32, generator=g)).reshape(-1, 32)
    x = torch.cat([big, small])
    n = 20
    greedy = _coverage(x, greedy_coreset(x, n, projection_dim=projection_dim, seed=0))
    random_cover = min(_coverage(x, torch.randperm(len(x), generator=g)[:n]) for _ in range(10))
    assert greedy < random_cover / 2


def test_greedy_coreset_sizes_and_seed():
    x = torch.randn(50, 4)
    assert greedy_coreset(x, 100, projection_dim=0).shape == (50,)  # capped at N
    assert greedy_coreset(x, 0, projection_dim=0).shape == (1,)  # at least one
    a, b = greedy_coreset(x, 10, 2, seed=5), greedy_coreset(x, 10, 2, seed=5)
    assert torch.equal(a, b)


@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
def test_nearest_centre_distances_equal_cdist(chunk):
    g = torch.Generator().manual_seed(chunk)
    queries, bank = torch.randn(50, 16, generator=g), torch.randn(23, 16, generator=g)
    expected = torch.cdist(queries, bank).min(dim=1).values
    distances, index = nearest_centres(queries, bank, chunk=chunk)
    torch.testing.assert_close(distances, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(index, torch.cdist(queries, bank).argmin(dim=1))  # |q|^2 added after the minimum: same one
    # a query equal to a bank row is at distance ~0 (no NaN from a tiny negative square)
    d = nearest_centres(bank[:3], bank, chunk=chunk)[0]
    assert torch.isfinite(d).all() and d.max() < 1e-2
    assert nearest_centres(queries[:0], bank)[0].shape == (0,)


def test_aggregate_patches_shapes_and_local_average():
    f1, f2 = torch.rand(2, 4, 8, 8), torch.rand(2, 6, 4, 4)
    out = aggregate_patches([f1, f2], patch_size=3)
    assert out.shape == (2, 10, 8, 8)
    # first stage: the interior is a plain 3x3 average
    torch.testing.assert_close(out[:, :4, 1:-1, 1:-1], F.avg_pool2d(f1, 3, stride=1))
    # a corner averages its 4 real neighbours with 5 zeros of padding, as PatchCore's reference code does
    torch.testing.assert_close(out[:, :4, 0, 0], f1[:, :, :2, :2].sum(dim=(2, 3)) / 9)
    assert aggregate_patches([f1], patch_size=1).equal(f1)


SIZE = 32
COMMON = dict(weights="random", image_size=SIZE, device="cpu", progress=False, batch_size=8, calibration_fraction=0.0,
              stages=(1, 2), projection_dim=16)


@pytest.fixture(scope="module")
def normals():
    g = torch.Generator().manual_seed(0)
    base = 0.4 + 0.05 * torch.rand(1, 3, SIZE, SIZE, generator=g)
    return (base + 0.02 * torch.rand(8, 3, SIZE, SIZE, generator=g)).clamp(0, 1)


def _patches_per_image():
    # stride-4 grid of the first stage at 32 px
    return (SIZE // 4) ** 2


def test_bank_size_follows_ratio_cap_and_candidates(normals):
    n_patches = len(normals) * _patches_per_image()
    det = create_detector("patchcore", coreset_ratio=0.25, **COMMON).fit(normals)
    assert det.net_.memory_bank.shape[0] == round(0.25 * n_patches)
    det = create_detector("patchcore", coreset_ratio=0.25, max_bank_size=10, **COMMON).fit(normals)
    assert det.net_.memory_bank.shape[0] == 10
    det = create_detector("patchcore", coreset_ratio=0.5, coreset="greedy", coreset_candidates=40,
                          **COMMON).fit(normals)
    assert det.net_.memory_bank.shape[0] == 40  # cannot keep more than the candidates searched
    assert det.net_.memory_bank.shape[1] == sum(det.backbone_.channels)


def test_bank_rows_are_training_patches(normals):
    det = create_detector("patchcore", coreset_ratio=0.1, **COMMON).fit(normals)
    patches = det.net_.embed(normals).permute(0, 2, 3, 1).reshape(-1, det.net_.memory_bank.shape[1])
    d = torch.cdist(det.net_.memory_bank, patches, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
    assert d.max() < 1e-4


def test_defect_scores_higher_than_normals(normals):
    det = create_detector("patchcore", coreset_ratio=0.25, image_pooling="max", **COMMON).fit(normals)
    g = torch.Generator().manual_seed(1)
    test = (normals[:4] + 0.01 * torch.rand(4, 3, SIZE, SIZE, generator=g)).clamp(0, 1)
    defect = test.clone()
    defect[:, :, 12:20, 12:20] = 1.0  # a bright square
    good, bad = det.score(test), det.score(defect)
    assert bad.image_scores.min() > good.image_scores.max()
    assert bad.anomaly_maps.shape == (4, SIZE, SIZE)
    # (no localisation check: random-init stage features spread a defect over the whole 32 px image)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"coreset_ratio": 0}, r"coreset_ratio must be in \(0, 1\], got 0"),
        ({"coreset_ratio": 2}, r"coreset_ratio must be in \(0, 1\], got 2"),
        ({"max_bank_size": 0}, "max_bank_size must be in"),
        ({"stages": ()}, "stages must not be empty"),
        ({"image_pooling": "median"}, "image_pooling must be one of"),
        ({"sigma": -1}, "sigma must be in"),
    ],
)
def test_out_of_range_parameters_are_refused_before_any_work(params, match):
    detector = create_detector("patchcore", weights="random", device="cpu", progress=False, **params)
    with pytest.raises(ValueError, match=match):
        detector.fit(torch.rand(2, 3, 32, 32))
    assert not hasattr(detector, "backbone_")  # refused before the backbone was even built


def test_reweighted_image_score_is_the_papers_eq_7_on_a_hand_case():
    from omniad.methods.patchcore import PatchCoreNet

    net = PatchCoreNet(torch.nn.Identity(), bank_size=3, feature_dim=2)
    net.memory_bank.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]]))
    emb = torch.tensor([[0.0, 3.0], [0.0, 0.5]]).T.reshape(1, 2, 1, 2)  # one image, two patches
    distances, index = net.nearest(emb)
    assert distances.flatten().tolist() == pytest.approx([3.0, 0.5]) and index.flatten().tolist() == [0, 0]
    # worst patch (0, 3): nearest bank entry m* = (0, 0); its 2 nearest entries are itself and (1, 0)
    to_support = torch.tensor([3.0, 10**0.5])
    expected = (1 - torch.softmax(to_support, 0)[0]) * 3.0
    got = net.reweighted_scores(emb, distances, neighbours=2)
    assert got.shape == (1,) and float(got) == pytest.approx(float(expected), rel=1e-6)
    assert float(net.reweighted_scores(emb, distances, neighbours=1)) == pytest.approx(0.0)  # 1 - 1


def _eq_7_by_brute_force(emb, bank, k):
    patches = emb.flatten(2).transpose(1, 2)  # (B, P, C)
    scores = []
    for image in patches:
        d = torch.cdist(image, bank)  # (P, bank)
        worst = int(d.min(1).values.argmax())
        m_star = int(d[worst].argmin())
        support = torch.cdist(bank[m_star][None], bank)[0].argsort()[:k]
        to_support = (image[worst] - bank[support]).norm(dim=-1)
        scores.append((1 - torch.softmax(to_support, 0)[0]) * d[worst].min())
    return torch.stack(scores)


def test_reweighted_score_follows_the_bank_when_it_changes():
    """The support sets are computed once per bank: a bank changed in place (load) or replaced (adaptation) must
    not keep the old ones."""
    from omniad.methods.patchcore import PatchCoreNet

    g = torch.Generator().manual_seed(0)
    net = PatchCoreNet(torch.nn.Identity(), bank_size=50, feature_dim=4)
    net.memory_bank.copy_(torch.randn(50, 4, generator=g))
    emb = torch.randn(3, 4, 5, 5, generator=g)
    for change in ("none", "in place", "replaced"):
        if change == "in place":
            net.memory_bank.copy_(torch.randn(50, 4, generator=g))
        elif change == "replaced":
            net.memory_bank = torch.cat([net.memory_bank, torch.randn(30, 4, generator=g)])
        got = net.reweighted_scores(emb, net.distances(emb), neighbours=9)
        torch.testing.assert_close(got, _eq_7_by_brute_force(emb, net.memory_bank, 9), msg=change)


def test_reweighted_pooling_keeps_the_map_and_scores_with_eq_7():
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    common = dict(weights="random", image_size=32, device="cpu", progress=False, stages=(1, 2), coreset_ratio=0.5,
                  calibration_fraction=0.0)
    plain = create_detector("patchcore", image_pooling="max", **common).fit(images)
    paper = create_detector("patchcore", image_pooling="reweighted", **common).fit(images)
    a, b = plain.score(images[:3]), paper.score(images[:3])
    torch.testing.assert_close(b.anomaly_maps, a.anomaly_maps)  # the same map: only the image score differs
    features = paper.features(images[:3])
    distances = paper.net_.distances(features)
    torch.testing.assert_close(b.image_scores, paper.net_.reweighted_scores(features, distances, 9))


def test_nearest_search_faiss_and_torch_agree_and_follow_the_bank():
    from omniad.cluster import NearestSearch, faiss_available, nearest_centres

    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(300, 24, generator=g), torch.randn(500, 24, generator=g)
    reference = nearest_centres(queries, bank, chunk=128)
    search = NearestSearch(bank, chunk=128)
    distances, index = search(queries)
    torch.testing.assert_close(distances, reference[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(index, reference[1])
    if not faiss_available():
        pytest.skip("faiss is not installed: the torch search served (omniad[faiss] adds faiss)")
    assert search._index is not None  # the faiss index was built and used

    from omniad.methods.patchcore import PatchCoreNet

    net = PatchCoreNet(torch.nn.Identity(), bank_size=300, feature_dim=24)
    net.memory_bank.copy_(bank)
    emb = queries[:16].T.reshape(1, 24, 4, 4)
    before = net.nearest(emb)[0]
    net.memory_bank.mul_(2)  # a changed bank (a refit, a load) must not be searched through a stale index
    after = net.nearest(emb)[0]
    torch.testing.assert_close(after, nearest_centres(emb.flatten(2).transpose(1, 2)[0], bank * 2)[0].view(1, 4, 4),
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after)


def test_a_float16_bank_is_the_rounded_float32_bank_saved_in_half_the_bytes(normals, tmp_path):
    from omniad import load_detector

    full = create_detector("patchcore", coreset_ratio=0.25, **COMMON).fit(normals)
    half = create_detector("patchcore", coreset_ratio=0.25, bank_dtype="float16", **COMMON).fit(normals)
    assert half.net_.memory_bank.dtype == torch.float16
    assert torch.equal(half.net_.memory_bank, full.net_.memory_bank.half())  # the same search, then rounded
    test = (normals[:4] + 0.05 * torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))).clamp(0, 1)
    full.net_.memory_bank.copy_(full.net_.memory_bank.half().float())  # float32 arithmetic on the rounded entries
    expected, got = full.score(test), half.score(test)
    torch.testing.assert_close(got.image_scores, expected.image_scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.anomaly_maps, expected.anomaly_maps, rtol=1e-5, atol=1e-6)
    full.save(tmp_path / "full")
    half.save(tmp_path / "half")
    size = {k: sum(f.stat().st_size for f in (tmp_path / k).rglob("*.safetensors")) for k in ("full", "half")}
    bank_bytes = full.net_.memory_bank.numel() * 2
    assert size["full"] - size["half"] == bank_bytes  # the bank alone shrank, by half its float32 size
    loaded = load_detector(tmp_path / "half")
    assert loaded.net_.memory_bank.dtype == torch.float16
    torch.testing.assert_close(loaded.score(test).image_scores, got.image_scores, rtol=0, atol=0)


def test_the_ivf_search_probing_every_cell_is_exact_and_fewer_cells_never_find_a_nearer_entry(normals, tmp_path):
    pytest.importorskip("faiss", reason="search='ivf' is faiss's index (omniad[faiss])")
    from omniad import load_detector
    from omniad.export import ExportError, export_detector

    exact = create_detector("patchcore", coreset_ratio=0.25, **COMMON).fit(normals)
    every_cell = create_detector("patchcore", coreset_ratio=0.25, search="ivf", nlist=8, nprobe=8,
                                 **COMMON).fit(normals)
    one_cell = create_detector("patchcore", coreset_ratio=0.25, search="ivf", nlist=8, nprobe=1,
                               **COMMON).fit(normals)
    test = (normals[:4] + 0.3 * torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))).clamp(0, 1)
    emb = exact.features(test)
    d_exact = exact.net_.distances(emb)
    torch.testing.assert_close(every_cell.net_.distances(emb), d_exact, rtol=1e-5, atol=1e-5)
    d_one = one_cell.net_.distances(emb)
    assert (d_one >= d_exact - 1e-5).all()  # a missed nearest entry only raises the distance
    assert (d_one > d_exact + 1e-4).any()  # one cell of eight does miss some on these random features
    assert one_cell.net_._search_index._index.nlist == 8  # the approximate index was the one searched
    one_cell.save(tmp_path / "ivf")
    again = load_detector(tmp_path / "ivf")  # the seeded cells are rebuilt the same at load
    torch.testing.assert_close(again.net_.distances(emb), d_one, rtol=0, atol=0)
    with pytest.raises(ExportError, match=r"patchcore cannot be exported: .*search='ivf'.*search='exact'"):
        export_detector(one_cell, tmp_path / "ivf.onnx", verify=False)
    with pytest.raises(ValueError, match=r"nlist sets the cells of the approximate search \(search='ivf'\)"):
        create_detector("patchcore", nlist=8, **COMMON).fit(normals)
    with pytest.raises(ValueError, match="nprobe must be"):
        create_detector("patchcore", search="ivf", nprobe=0, **COMMON).fit(normals)
