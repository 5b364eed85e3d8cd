"""Two processes (gloo on the CPU, as torchrun starts them) give the same model as one: PaDiM's statistics summed
over ranks, PatchCore's paper coreset searched by both ranks together, a trained method's gradients averaged by
DDP; PatchCore's chunked coreset joins each rank's chunks; only rank 0 writes the model."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from omniad import create_detector, load_detector

SIZE = 32
COMMON = dict(weights="random", image_size=SIZE, batch_size=4, device="cpu", progress=False, seed=0,
              calibration_fraction=0.0)
CASES = {
    "padim": dict(stages=(1, 2), n_features=12),
    # the calibration hold-out drawn per cluster: each rank pools its shard, every rank clusters the gathered rows
    "padim-calibrated": dict(stages=(1, 2), n_features=12, calibration_fraction=0.25, calibration_strata=2),
    # the paper's greedy search shared by the ranks (one all_gather per centre), with and without candidates
    "patchcore": dict(stages=(1, 2), coreset_ratio=0.2, projection_dim=16, coreset="greedy"),
    "patchcore-candidates": dict(stages=(1, 2), coreset_ratio=0.2, projection_dim=16, coreset="greedy",
                                 coreset_candidates=500),
    # the default: each rank reduces its own chunks
    "patchcore-chunked": dict(stages=(1, 2), coreset_ratio=0.2, projection_dim=16, coreset_chunk_size=100),
    # no dropout and no jitter: the only difference between 1 and 2 processes is how the batch is shared
    "uniad": dict(preset="cpu", hidden_dim=16, num_encoder_layers=1, num_decoder_layers=1, num_heads=2,
                  dim_feedforward=32, feature_stride=8, neighbor_size=1, epochs=6, train_batch_size=4, lr=1e-2,
                  dropout=0.0, jitter_alpha=0.0),
    # DEFEND's crops and the random masks are drawn per image of the global batch, Sinkhorn sums over every rank
    "mkd": dict(preset="cpu", stages=(2,), embed_dim=16, depth=1, num_heads=2, epochs=3, min_steps=0,
                train_batch_size=4, masking="random", defend=True, defend_epochs=2, defend_lr=1e-3, head_hidden=16,
                head_dim=8),
}


def _method(case: str) -> str:
    return case.split("-")[0]


def _images() -> torch.Tensor:
    return torch.rand(12, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for name, params in CASES.items():
            detector = create_detector(_method(name), **{**COMMON, **params}).fit(_images())
            detector.save(f"{folder}/{name}-rank{rank}")  # only rank 0 writes
            if name == "uniad":
                torch.save(detector.loss_history_, f"{folder}/uniad-history-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, _free_port(), str(folder)), nprocs=2, join=True)
    return folder


def test_only_rank_zero_writes(two_process_run):
    for name in CASES:
        assert (two_process_run / f"{name}-rank0" / "config.json").is_file()
        assert not (two_process_run / f"{name}-rank1").exists()


@pytest.mark.parametrize("name", [case for case in CASES if case != "patchcore-chunked"])
def test_two_processes_give_the_model_of_one(two_process_run, name):
    one = create_detector(_method(name), **{**COMMON, **CASES[name]}).fit(_images())
    two = load_detector(two_process_run / f"{name}-rank0")
    if one.calibration_ is not None:  # the same held-out images, clusters and threshold as one process
        assert two.calibration_.normal_groups.tolist() == one.calibration_.normal_groups.tolist()
        assert two.calibration_.threshold == pytest.approx(one.calibration_.threshold, rel=1e-4)
    mine, theirs = one.state_tensors(), two.state_tensors()
    assert set(mine) == set(theirs)
    # the statistics and the bank differ by summation order only; a trained net's weights are compared through
    # its scores, since attention's key biases get a gradient of pure rounding noise (softmax ignores them),
    # which Adam scales up to steps of lr size whatever the number of processes
    if name not in ("uniad", "mkd"):
        for key in mine:
            torch.testing.assert_close(theirs[key], mine[key], rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
    test = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(two.score(test).image_scores, one.score(test).image_scores, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(two.score(test).anomaly_maps, one.score(test).anomaly_maps, rtol=1e-3, atol=1e-4)


def test_two_processes_join_the_chunked_coresets_of_their_shards(two_process_run):
    """Each rank streams its strided shard (images 0, 2, ... and 1, 3, ...) through its own chunks: the bank is
    rank 0's chunk coresets, then rank 1's, each what one process makes of that shard alone."""
    two = load_detector(two_process_run / "patchcore-chunked-rank0").net_.memory_bank
    images = _images()
    shards = [create_detector("patchcore", **COMMON, **CASES["patchcore-chunked"]).fit(images[r::2]).net_.memory_bank
              for r in (0, 1)]
    assert sum(s.shape[0] for s in shards) == two.shape[0] == round(0.2 * 12 * 64)  # 12 images x 8 x 8 patches
    torch.testing.assert_close(two, torch.cat(shards), rtol=1e-5, atol=1e-6)


def test_the_trained_method_learns_the_same_way(two_process_run):
    history = torch.load(two_process_run / "uniad-history-rank0.pt")
    assert history == torch.load(two_process_run / "uniad-history-rank1.pt")  # every rank reports the global loss
    assert history[-1] < history[0]
    one = create_detector("uniad", **COMMON, **CASES["uniad"]).fit(_images())
    assert history == pytest.approx(one.loss_history_, rel=1e-4)


def test_torchrun_runs_the_command_line_and_rank_zero_writes(synthetic_root, tmp_path):
    """``torchrun --nproc-per-node 2 -m omniad fit ...``: the model equals the one-process model."""
    import os
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on the PATH")
    args = ["fit", "--data", str(synthetic_root), "--method", "padim", "--weights", "random", "--image-size", "32",
            "--stages", "1", "2", "--n-features", "12", "--device", "cpu", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", str(_free_port()), "-m", "omniad",
                          *args, "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("saved model to") == 1  # rank 1 computes the same model and says nothing
    one = subprocess.run([sys.executable, "-m", "omniad", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    a, b = load_detector(tmp_path / "one").state_tensors(), load_detector(tmp_path / "two").state_tensors()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-4)


def _predict_worker(rank: int, world: int, port: int, model: str, folder: str, out: str) -> None:
    from omniad import predict

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = predict(load_detector(model), folder, out)
        torch.save([(r.path, r.score, r.anomalous) for r in result.results], f"{out}/../rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sharded_predict_scores_every_image_once(tmp_path):
    import csv

    from PIL import Image

    from omniad import predict

    folder = tmp_path / "in"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(7):
        pixels = (torch.rand(SIZE, SIZE, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    (folder / "broken.png").write_text("not an image")
    detector = create_detector("padim", **{**COMMON, "calibration_fraction": 0.25}, **CASES["padim"]).fit(_images())
    detector.save(tmp_path / "model")
    one = predict(detector, folder, tmp_path / "one")
    mp.spawn(_predict_worker, args=(2, _free_port(), str(tmp_path / "model"), str(folder), str(tmp_path / "two")),
             nprocs=2, join=True)
    rows = list(csv.DictReader(open(tmp_path / "two" / "results.csv")))
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in folder.iterdir())  # every file once
    assert [r["error"] != "" for r in rows].count(True) == 1
    both = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert both[0] == both[1]  # every process returns the whole, ordered result
    assert [p for p, _, _ in both[0]] == [r.path for r in one.results]
    assert [s for _, s, _ in both[0]] == pytest.approx([r.score for r in one.results], rel=1e-5)
    assert [d for _, _, d in both[0]] == [r.anomalous for r in one.results]
    overlays = sorted(p.name for p in (tmp_path / "two" / "overlays").iterdir())
    assert overlays == sorted(p.name for p in (tmp_path / "one" / "overlays").iterdir()) and len(overlays) == 7
