"""Tiled inspection and aspect-kept input: tiles cover each image exactly, stitching averages overlaps, a defect
lands where it was painted, padding never counts, every registered method fits and scores in both modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omniad import create_detector, list_detectors, load_detector
from omniad.data.images import KeepAspect, letterbox, resize_image
from omniad.data.sources import iterate_batches, iterate_samples
from omniad.metrics import evaluate
from omniad.metrics.pro import pixel_metrics
from omniad.postprocess import image_score
from omniad.registry import detector_class
from omniad.tiling import Stitcher, TileDataset, cut_tiles, tile_boxes, tile_starts, tiling_size
from omniad.types import Sample

COMMON = dict(weights="random", device="cpu", progress=False, seed=0, batch_size=8)


def _textures(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Grey images with mild noise: normal images whose only structure is noise."""
    g = torch.Generator().manual_seed(seed)
    return (0.5 + 0.05 * torch.randn(n, 3, height, width, generator=g)).clamp(0, 1)


# ----------------------------------------------------------------- geometry
def test_tile_starts_step_by_stride_and_end_at_the_edge():
    assert tile_starts(10, 4, 3) == [0, 3, 6]
    assert tile_starts(11, 4, 3) == [0, 3, 6, 7]  # the last tile moved back to end at the edge
    assert tile_starts(3, 4, 2) == [0]  # smaller than a tile: one (padded) tile
    assert tile_starts(8, 4, 4) == [0, 4]


@pytest.mark.parametrize("height,width,tile,stride", [(100, 260, 64, 32), (64, 64, 64, 64), (50, 130, 64, 48),
                                                      (97, 71, 32, 32)])
def test_stitching_all_ones_tile_maps_gives_all_ones(height, width, tile, stride):
    boxes = tile_boxes(height, width, tile, stride)
    stitcher = Stitcher(height, width, tile)
    stitcher.add(torch.ones(len(boxes), tile, tile), boxes)
    assert stitcher.result().shape == (height, width)
    assert torch.equal(stitcher.result(), torch.ones(height, width))
    assert all(y + tile <= max(height, tile) and x + tile <= max(width, tile) for y, x in boxes)


def test_overlaps_are_averaged():
    # a 4 x 6 image, 4-pixel tiles every 2: tiles at x = 0 and x = 2 overlap on columns 2-3
    boxes = tile_boxes(4, 6, 4, 2)
    assert boxes == [(0, 0), (0, 2)]
    stitcher = Stitcher(4, 6, 4)
    stitcher.add(torch.stack([torch.full((4, 4), 1.0), torch.full((4, 4), 3.0)]), boxes)
    expected = torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0, 3.0]).expand(4, 6)
    assert torch.equal(stitcher.result(), expected)


def test_tiles_are_the_image_crops_and_the_dataset_lists_every_tile():
    images = [torch.rand(3, 40, 70), torch.rand(3, 20, 30)]
    tiles = TileDataset(images, tile=32, stride=16)
    # the small image is up-sampled, aspect kept, until its shorter side fills a tile: 20 x 30 -> 32 x 48
    assert tiling_size(20, 30, 32) == (32, 48) and tiling_size(40, 70, 32) == (40, 70)
    assert len(tiles) == len(tile_boxes(40, 70, 32, 16)) + len(tile_boxes(32, 48, 32, 16))
    first = cut_tiles(images[0], tile_boxes(40, 70, 32, 16), 32)
    assert torch.equal(tiles[1], first[1])
    small = cut_tiles(resize_image(images[1], (32, 48)), tile_boxes(32, 48, 32, 16), 32)
    assert torch.equal(tiles[len(tiles) - 1], small[-1])


def test_tiles_of_files_are_counted_from_headers_and_each_file_is_decoded_once_per_pass(tmp_path, monkeypatch):
    from PIL import Image

    import omniad.data.mvtec as mvtec
    from omniad.data import MVTecDataset
    from omniad.data.sources import as_image_dataset

    good = tmp_path / "part" / "train" / "good"
    good.mkdir(parents=True)
    (tmp_path / "part" / "test" / "good").mkdir(parents=True)
    sizes = [(40, 70), (20, 30), (64, 33)]  # (height, width)
    for k, (h, w) in enumerate(sizes):
        Image.fromarray(np.random.default_rng(k).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(good / f"{k}.png")
        Image.fromarray(np.zeros((h, w, 3), dtype=np.uint8)).save(tmp_path / "part" / "test" / "good" / f"{k}.png")
    decoded = []
    real_read = mvtec.read_image
    monkeypatch.setattr(mvtec, "read_image", lambda path, *a, **k: decoded.append(path) or real_read(path, *a, **k))
    images = as_image_dataset(MVTecDataset(tmp_path, split="train", image_size=None))
    assert [images.image_hw(i) for i in range(3)] == sizes
    tiles = TileDataset(images, tile=32, stride=16)
    assert decoded == []  # the tile counts came from the headers
    assert len(tiles) == sum(len(tile_boxes(*tiling_size(h, w, 32), 32, 16)) for h, w in sizes)
    first = [tiles[k] for k in range(len(tiles))]
    assert len(decoded) == 3  # one sequential pass decodes each file once
    assert torch.equal(first[0], real_read(good / "0.png")[:, :32, :32])
    # a resizing dataset cannot tell sizes from headers: the images are read
    assert as_image_dataset(MVTecDataset(tmp_path, split="train", image_size=48)).image_hw(0) is None


def test_a_small_image_is_scored_up_sampled_and_its_map_comes_at_its_own_size():
    det = create_detector("padim", image_size=32, tile_size=32, tile_stride=16, **COMMON).fit(_textures(4, 40, 60))
    image = _textures(1, 20, 30, seed=7)
    image[:, :, 4:10, 18:26] = 1.0
    result = det.score(image)
    assert result.anomaly_maps.shape == (1, 20, 30)
    peak = divmod(int(result.anomaly_maps[0].argmax()), 30)
    assert 4 - 3 <= peak[0] < 10 + 3 and 18 - 3 <= peak[1] < 26 + 3  # where it was painted, in its own pixels


def test_keep_aspect_and_letterbox():
    assert KeepAspect(640, 256).size_of(1260, 500) == (640, 254)
    assert KeepAspect(64, 64).size_of(32, 64) == (32, 64)
    padded, content = letterbox(torch.rand(2, 3, 50, 100), 64, 64)
    assert content == (32, 64) and padded.shape == (2, 3, 64, 64)
    assert padded[:, :, 32:].abs().sum() == 0


# ----------------------------------------------------------------- detectors
def test_a_defect_painted_in_one_tile_shows_up_there_in_the_stitched_map():
    det = create_detector("padim", image_size=64, tile_size=64, tile_stride=32, **COMMON)
    det.fit(_textures(6, 96, 192))
    image = _textures(1, 96, 192, seed=5)
    image[:, :, 60:72, 140:152] = 1.0  # a bright square in the lower right tiles
    result = det.score(image)
    assert result.anomaly_maps.shape == (1, 96, 192)  # the image's own size
    peak = int(result.anomaly_maps[0].argmax())
    y, x = divmod(peak, 192)
    assert 52 <= y <= 80 and 132 <= x <= 160, (y, x)
    normal = det.score(_textures(1, 96, 192, seed=6))
    assert float(result.image_scores[0]) > float(normal.image_scores[0])


def test_tiles_are_scored_in_batches_of_batch_size():
    det = create_detector("padim", image_size=32, tile_size=32, tile_stride=32, **{**COMMON, "batch_size": 4})
    det.fit(_textures(2, 64, 64))
    seen = []
    features = det.features
    det.features = lambda images: seen.append(images.shape[0]) or features(images)
    result = det.score(_textures(1, 256, 320))
    assert result.anomaly_maps.shape == (1, 256, 320)
    assert len(seen) == -(-(8 * 10) // 4) and max(seen) == 4  # 80 tiles, never more than 4 at once


def test_a_pair_image_size_keeps_the_aspect_ratio_and_padding_never_counts():
    det = create_detector("padim", image_size=(64, 64), **COMMON)
    det.fit(_textures(6, 32, 64))  # every training image is half padding
    normal, defect = _textures(1, 32, 64, seed=3), _textures(1, 32, 64, seed=4)
    defect[:, :, 10:20, 30:40] = 1.0
    scores = det.score(torch.cat([normal, defect]))
    assert scores.anomaly_maps.shape == (2, 32, 64)  # the content (aspect kept), the padding cut off
    wide = det.score(_textures(1, 50, 200, seed=5))
    assert wide.anomaly_maps.shape == (1, 16, 64)  # 50 x 200 fitted into 64 x 64: 16 x 64
    # the image score is pooled from the content alone
    pooled = image_score(scores.anomaly_maps, det.resolved_.image_pooling, det.resolved_.top_fraction)
    assert torch.allclose(pooled, scores.image_scores)
    assert float(scores.image_scores[1]) > float(scores.image_scores[0])


def test_a_tiled_model_saves_and_loads_with_its_tiling_and_equal_scores(tmp_path):
    det = create_detector("padim", image_size=32, tile_size=32, tile_stride=24, **COMMON)
    det.fit(_textures(4, 48, 80))
    images = _textures(2, 50, 90, seed=9)
    det.save(str(tmp_path / "model"))
    loaded = load_detector(str(tmp_path / "model"))
    assert (loaded.tile_size, loaded.tile_stride) == (32, 24)
    before, after = det.score(images), loaded.score(images)
    assert after.anomaly_maps.shape == (2, 50, 90)
    assert torch.allclose(before.image_scores, after.image_scores)
    assert torch.allclose(before.anomaly_maps, after.anomaly_maps)


def test_tiling_settings_are_checked():
    with pytest.raises(ValueError, match="tile_stride"):
        create_detector("padim", image_size=32, tile_size=32, tile_stride=40, **COMMON).fit(_textures(2, 40, 40))
    with pytest.raises(ValueError, match="square image_size"):
        create_detector("padim", image_size=(32, 64), tile_size=32, **COMMON).fit(_textures(2, 40, 40))


def test_tiled_and_aspect_models_refuse_export_with_a_clear_error(tmp_path):
    from omniad.export import ExportError

    det = create_detector("padim", image_size=32, tile_size=32, **COMMON).fit(_textures(2, 40, 40))
    with pytest.raises(ExportError, match="tiled inspection"):
        det.export(str(tmp_path / "m.onnx"))
    from omniad.serve.service import BatchScorer

    with pytest.raises(ValueError, match="cannot be served"):
        BatchScorer(det)


@pytest.mark.parametrize("name", list_detectors())
def test_every_method_fits_and_scores_tiled_and_with_a_pair_image_size(name):
    """The contract in brief for both input modes: maps at the image's own size (tiled) or the aspect-kept
    content (pair), finite, scores that depend on the image."""
    params = {**COMMON, **detector_class(name).test_params, "calibration_fraction": 0.0}
    if not detector_class(name).supports_input_modes:  # e.g. mutual scoring of whole images: refused, clearly
        for modes in ({"image_size": 64, "tile_size": 64}, {"image_size": (64, 96)}):
            with pytest.raises(ValueError, match="whole square images only"):
                create_detector(name, **{**params, **modes}).fit(_textures(3, 96, 128))
        return
    tiled = create_detector(name, **{**params, "image_size": 64, "tile_size": 64, "tile_stride": 64})
    tiled.fit(_textures(3, 96, 128))
    images = _textures(2, 100, 130, seed=2)
    images[1, :, 40:60, 50:70] = 1.0
    result = tiled.score(images)
    assert result.anomaly_maps.shape == (2, 100, 130)
    assert torch.isfinite(result.anomaly_maps).all() and torch.isfinite(result.image_scores).all()
    assert float(result.image_scores[0]) != float(result.image_scores[1])

    pair = create_detector(name, **{**params, "image_size": (64, 96)})
    pair.fit(_textures(3, 48, 128))
    result = pair.score(images)
    assert result.anomaly_maps.shape == (2, 64, 83)  # 100 x 130 fitted inside 64 x 96
    assert torch.isfinite(result.anomaly_maps).all() and torch.isfinite(result.image_scores).all()


# ----------------------------------------------------------------- images of several sizes
def test_batches_of_images_of_several_sizes_come_as_runs_of_one_size():
    images = [torch.rand(3, 10, 10), torch.rand(3, 10, 10), torch.rand(3, 12, 8), torch.rand(3, 10, 10)]
    batches = list(iterate_batches(images, batch_size=4))
    assert [tuple(b.shape) for b in batches] == [(2, 3, 10, 10), (1, 3, 12, 8), (1, 3, 10, 10)]
    assert torch.equal(torch.cat([b.flatten(1) for b in batches if b.shape[-1] == 10]),
                       torch.stack([images[0], images[1], images[3]]).flatten(1))
    samples = [Sample(im, torch.zeros(im.shape[1:]), 0, "a") for im in images]
    assert [len(b) for b in iterate_samples(samples, batch_size=4)] == [2, 1, 1]


def test_pixel_metrics_of_maps_of_several_sizes_equal_those_of_one_stack():
    rng = np.random.default_rng(0)
    masks = rng.random((2, 20, 30)) > 0.9
    maps = rng.random((2, 20, 30)) + masks
    as_stack = pixel_metrics(masks, maps)
    as_list = pixel_metrics(list(masks), list(maps))
    assert as_list == pytest.approx(as_stack)
    # and with sizes that differ: the regions of each image stay its own
    mixed = pixel_metrics([masks[0], masks[1][:10]], [maps[0], maps[1][:10]])
    assert np.isfinite(mixed["aupro"]) and 0.0 <= mixed["aupro"] <= 1.0 + 1e-9


def test_evaluate_reports_pixel_metrics_on_stitched_maps_of_images_of_several_sizes():
    det = create_detector("padim", image_size=32, tile_size=32, tile_stride=16, **COMMON)
    det.fit(_textures(4, 48, 64))
    samples = []
    for i, (height, width) in enumerate([(48, 64), (40, 90), (48, 64), (40, 90)]):
        image = _textures(1, height, width, seed=20 + i)[0]
        mask = torch.zeros(height, width)
        if i % 2:
            image[:, 10:20, 20:30] = 1.0
            mask[10:20, 20:30] = 1.0
        samples.append(Sample(image, mask, i % 2, "a" if i < 2 else "b", path=f"img{i}"))
    report = evaluate(det, samples, progress=False)
    assert report.meta["map_size"] == "own size per image (2 sizes)"
    assert np.isfinite(report.rows["mixed"]["pixel_aupro"])
    assert report.rows["mixed"]["pixel_auroc"] > 0.5


def test_a_tiled_fit_on_images_of_several_sizes_calibrates_on_whole_images():
    det = create_detector("padim", image_size=32, tile_size=32, **{**COMMON, "calibration_fraction": 0.25})
    images = [_textures(1, 40 + 8 * (i % 2), 64 - 14 * (i % 2), seed=i)[0] for i in range(8)]
    det.fit(images)
    assert det.calibration_.normal_scores.size == 2  # two held-out images, not their tiles
    assert np.isfinite(det.threshold_)
    scored = det.score_dataset(images[:3])
    assert [tuple(m.shape) for m in scored.anomaly_maps] == [(40, 64), (48, 50), (40, 64)]


# ----------------------------------------------------------------- CADA on stitched maps
def _cada(**modes):
    params = {"base": "padim", "iterations": 30, **COMMON, "calibration_fraction": 0.0, **modes}
    return create_detector("cada", **params)


def test_tiled_cada_aligns_the_stitched_map_with_one_statistic_per_image():
    """The base is tiled and stitches; CADA's aligned map is (stitched map - u) / spread with ONE (u, spread) per
    image, so aligned and stitched maps are exactly affine. Aligning each tile with its own statistics, as before,
    breaks that."""
    images = _textures(4, 64, 112)
    cada = _cada(image_size=32, tile_size=32, tile_stride=32).fit(images)
    assert (cada.base_.tile_size, cada.base_.tile_stride) == (32, 32)
    test = _textures(2, 70, 100, seed=5)
    test[1, :, 5:15, 60:80] = 1.0
    stitched, aligned = cada.base_.score(test).anomaly_maps, cada.score(test).anomaly_maps
    assert aligned.shape == (2, 70, 100)
    for raw, out in zip(stitched, aligned):
        design = torch.stack([raw.flatten().double(), torch.ones(raw.numel(), dtype=torch.float64)], 1)
        solution = torch.linalg.lstsq(design, out.flatten().double()[:, None]).solution
        residual = design @ solution - out.flatten().double()[:, None]
        assert float(residual.abs().max()) < 1e-4 * float(out.abs().max())
    # the targets were computed on whole stitched training maps: one row per image, not per tile
    assert len(cada.extract(images)) == 4


def test_cada_with_a_pair_image_size_aligns_the_content_and_trains_to_a_finite_loss():
    cada = _cada(image_size=(32, 64)).fit(_textures(6, 40, 100))
    assert np.isfinite(cada.loss_history_).all()
    result = cada.score(_textures(2, 40, 100, seed=3))
    assert result.anomaly_maps.shape == (2, 26, 64)  # 40 x 100 fitted inside 32 x 64, padding cut
    assert torch.isfinite(result.image_scores).all()
    raw, aligned = cada.score_with_base(_textures(2, 40, 100, seed=3))
    assert torch.equal(aligned.image_scores, result.image_scores)
    assert raw.anomaly_maps.shape == aligned.anomaly_maps.shape


def test_cada_over_a_given_base_refuses_a_different_geometry():
    base = create_detector("padim", image_size=32, tile_size=32, **{**COMMON, "calibration_fraction": 0.0})
    base.fit(_textures(2, 40, 60))
    with pytest.raises(ValueError, match="differ from its base"):
        _cada(base=base, image_size=32).fit(_textures(2, 40, 60))
    _cada(base=base, image_size=32, tile_size=32).fit(_textures(2, 40, 60))  # the same geometry: accepted
