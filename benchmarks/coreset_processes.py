"""The coreset search on one process against several (torch.distributed, gloo): wall time of the paper's greedy
search shared by the ranks (``omniad.coreset.ShardedGreedy``) and of the chunked search, each rank reducing the
chunks of its own shard, on the same patches; and whether the shared search selects what one process does.

Patches: ``--patches`` rows of ``--dim`` floats drawn around 50 centres (seeded), at ``--ratio``.

    python benchmarks/coreset_processes.py --patches 200000 --processes 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from omniad.coreset import ShardedGreedy, StreamingCoreset, greedy_coreset

RESULTS = Path(__file__).resolve().parent / "results"


def patches(n: int, dim: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(50, dim, generator=g) * 4
    return centres[torch.randint(50, (n,), generator=g)] + torch.randn(n, dim, generator=g)


def _worker(rank: int, size: int, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:
        x = patches(args.patches, args.dim)
        k = round(args.ratio * args.patches)
        # rank r holds rows r, r + size, ... (as PatchCore's ranks hold the patches of their strided images)
        local, index = x[rank::size], torch.arange(rank, args.patches, size)
        dist.barrier()
        started = time.perf_counter()
        chosen, _ = ShardedGreedy(local, index, args.patches, 128, seed=0).select(k)
        greedy_s = time.perf_counter() - started
        dist.barrier()
        started = time.perf_counter()
        search = StreamingCoreset(k / args.patches, seed=0)
        for start in range(0, local.shape[0], 4096):
            search.add(local[start : start + 4096])
        search.finish()
        chunked_s = time.perf_counter() - started
        if rank == 0:
            torch.save({"chosen": chosen, "greedy_s": greedy_s, "chunked_s": chunked_s}, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patches", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=152)
    ap.add_argument("--ratio", type=float, default=0.01)
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", type=Path, default=RESULTS / "coreset-processes.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    x = patches(args.patches, args.dim)
    k = round(args.ratio * args.patches)
    started = time.perf_counter()
    reference = greedy_coreset(x, k, 128, seed=0)
    rows = [{"processes": "1 (greedy_coreset, no process group)", "greedy_seconds": time.perf_counter() - started}]
    print(json.dumps(rows[-1]), flush=True)
    for size in args.processes:
        with tempfile.TemporaryDirectory() as tmp:
            out = f"{tmp}/rank0.pt"
            mp.spawn(_worker, args=(size, _free_port(), args, out), nprocs=size, join=True)
            got = torch.load(out)
        rows.append({"processes": size, "greedy_seconds": got["greedy_s"], "chunked_seconds": got["chunked_s"],
                     "same_coreset_as_one_process": bool(torch.equal(got["chosen"], reference))})
        print(json.dumps(rows[-1]), flush=True)
    meta = {"command": "python benchmarks/coreset_processes.py " + " ".join(sys.argv[1:]),
            "machine": f"{platform.node()}, {os.cpu_count()} cores, 1 torch thread per process",
            "load_at_end": os.getloadavg()[0], "patches": args.patches, "dim": args.dim, "centres": k}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
