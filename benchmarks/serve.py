"""Loopback load benchmark of ``omniad serve``: throughput, latency percentiles, errors and the server's peak
memory under N requests from C concurrent clients, all on 127.0.0.1.

    python benchmarks/serve.py                     # fits PaDiM (offline ImageNet weights, 256 px) on a small
                                                   # synthetic set first, then serves it
    python benchmarks/serve.py --model MODEL       # any model the service's loader reads

The server is ``omniad serve`` in a subprocess (uvicorn, one process, as a user runs it); the clients are threads
of this process with one keep-alive connection each, sending one PNG of the model's size per request (synthetic
test images, normal and defective). Bounded: --requests (1000), --concurrency (8), --time-limit (600 s), and
127.0.0.1 only. Peak memory is the server's VmHWM (Linux). On a small machine clients and server share the
cores: the numbers are a floor for the service alone, and the load average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from common import peak_rss_mib

import omniad
from omniad.data.synthetic import make_synthetic_dataset

HOST = "127.0.0.1"  # loopback only, whatever else the machine can reach


def fit_default_model(folder: Path, size: int, n_train: int, seed: int) -> Path:
    """PaDiM with offline ImageNet weights fitted on a small synthetic set, saved to ``folder / "model"``."""
    from omniad.data import MVTecDataset

    root = make_synthetic_dataset(folder / "train-data", n_train=n_train, n_test_good=1, n_test_defect=1,
                                  image_size=size, seed=seed)
    detector = omniad.create_detector("padim", weights="offline", image_size=size, progress=False, seed=seed)
    started = time.perf_counter()
    detector.fit(MVTecDataset(root, split="train", image_size=size))
    print(f"fitted padim on {n_train * 4} synthetic images at {size} px in {time.perf_counter() - started:.0f} s; "
          f"{detector.calibration_.describe()}", file=sys.stderr)
    detector.save(folder / "model")
    return folder / "model"


def request_images(folder: Path, size: int, seed: int) -> list[tuple[str, bytes]]:
    """PNG files of the model's size: the synthetic set's test images (normal and every defect type)."""
    root = make_synthetic_dataset(folder / "request-data", n_train=1, n_test_good=4, n_test_defect=4,
                                  image_size=size, seed=seed + 1)
    files = sorted(root.glob("*/test/*/*.png"))
    return [(f"{f.parts[-4]}_{f.parts[-2]}_{f.name}", f.read_bytes()) for f in files]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def start_server(model: str, port: int, log: Path, threads: int | None) -> subprocess.Popen:
    src = str(Path(omniad.__file__).resolve().parents[1])  # the server runs the omniad this script imports
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    command = [sys.executable, "-m", "omniad.cli", "serve", "--model", model, "--host", HOST, "--port", str(port),
               "--log-level", "warning"] + ([] if threads is None else ["--threads", str(threads)])
    return subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_ready(url: str, server: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with status {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server did not answer /health within {timeout:.0f} s")


def run_load(url: str, images: list[tuple[str, bytes]], requests: int, concurrency: int,
             time_limit: float) -> dict:
    """``requests`` POST /predict of one image each from ``concurrency`` client threads; latencies and errors."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    issued = iter(range(requests))
    deadline = time.monotonic() + time_limit

    def client() -> None:
        with httpx.Client(base_url=url, timeout=60) as session:
            while time.monotonic() < deadline:
                with lock:
                    number = next(issued, None)
                if number is None:
                    return
                name, data = images[number % len(images)]
                started = time.perf_counter()
                try:
                    response = session.post("/predict", files=[("files", (name, data, "image/png"))])
                    ok = response.status_code == 200 and len(response.json()["results"]) == 1
                    problem = None if ok else f"{response.status_code}: {response.text[:200]}"
                except (httpx.HTTPError, ValueError, KeyError) as err:
                    problem = f"{type(err).__name__}: {err}"
                elapsed = time.perf_counter() - started
                with lock:
                    latencies.append(elapsed)
                    if problem:
                        errors.append(problem)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {
        "requests_done": len(latencies),
        "errors": len(errors),
        "first_errors": errors[:5],
        "seconds": wall,
        "requests_per_s": len(latencies) / wall,
        "latency_ms": {name: float(np.percentile(ms, q)) for name, q in
                       (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100))} if len(ms) else {},
        "stopped_by_time_limit": len(latencies) < requests,
    }


def direct_throughput(model: str, images: list[tuple[str, bytes]], threads: int | None,
                      min_seconds: float = 10.0) -> dict:
    """Images per second of the model's own ``score`` in this process on the same images (no HTTP), in batches of
    its batch size and one image at a time, with the server's torch threads: what the service is measured
    against."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)

    from omniad.data.images import decode_image
    from omniad.serve import load_model

    detector = load_model(model)
    batch = torch.cat([detector.preprocess(decode_image(data, name)) for name, data in images])
    rates = {}
    for label, step in ((f"batch_{detector.batch_size}", int(detector.batch_size)), ("batch_1", 1)):
        detector.score(batch[:step])  # warm-up
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < min_seconds:
            for start in range(0, len(batch), step):
                detector.score(batch[start:start + step])
            done += len(batch)
        rates[label] = done / (time.perf_counter() - started)
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model to serve (default: fit PaDiM, offline weights, on synthetic images)")
    parser.add_argument("--requests", type=int, default=1000, help="requests to send (default 1000)")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--warmup", type=int, default=16, help="requests before timing starts (default 16)")
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds the load may take (default 600)")
    parser.add_argument("--image-size", type=int, default=256, help="image size of the default model (256)")
    parser.add_argument("--n-train", type=int, default=20, help="training images per type of the default model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads of the server (default: torch's, one per core)")
    parser.add_argument("--direct", action=argparse.BooleanOptionalAction, default=True,
                        help="after the load, time the model's own score on the same images in this process")
    parser.add_argument("--out", help="write the results as JSON to this file")
    args = parser.parse_args(argv)
    if not (1 <= args.requests <= 100_000 and 1 <= args.concurrency <= 64):
        parser.error("--requests must be in 1..100000 and --concurrency in 1..64 (a bounded loopback test)")

    with tempfile.TemporaryDirectory(prefix="omniad-serve-bench-") as tmp:
        work = Path(tmp)
        model = args.model or str(fit_default_model(work, args.image_size, args.n_train, args.seed))
        port = free_port()
        url = f"http://{HOST}:{port}"
        log = work / "server.log"
        load_before = os.getloadavg()
        server = start_server(model, port, log, args.threads)
        try:
            wait_ready(url, server, 300, log)
            info = httpx.get(url + "/model", timeout=10).json()
            images = request_images(work, info["image_size"], args.seed)
            warm = run_load(url, images, args.warmup, min(args.concurrency, args.warmup), 120)
            if warm["errors"]:
                raise SystemExit(f"warm-up requests failed: {warm['first_errors']}")
            calls_before = httpx.get(url + "/health", timeout=10).json()
            result = run_load(url, images, args.requests, args.concurrency, args.time_limit)
            calls_after = httpx.get(url + "/health", timeout=10).json()
            peak = peak_rss_mib(server.pid)
        finally:
            server.terminate()
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()
        load_after = os.getloadavg()
        direct = direct_throughput(model, images, args.threads) if args.direct else None

    calls = calls_after["model_calls"] - calls_before["model_calls"]
    scored = calls_after["images_scored"] - calls_before["images_scored"]
    report = {
        "model": {"path": args.model or f"padim, offline weights, fitted on synthetic images ({args.n_train} per "
                                         "type x 4 types)",
                  "name": info["name"], "backbone": info["backbone"], "image_size": info["image_size"],
                  "batch_size": info["batch_size"]},
        "load": {"requests": args.requests, "concurrency": args.concurrency, "images_per_request": 1,
                 "request_png_bytes_mean": float(np.mean([len(d) for _, d in images])),
                 "server_torch_threads": args.threads or f"default ({os.cpu_count()} cores)"},
        **result,
        "mean_images_per_model_call": scored / calls if calls else None,
        "server_peak_rss_mib": peak,
        "direct_score_images_per_s": direct,
        "machine": {"nproc": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": load_after,
                    "python": platform.python_version(), "platform": platform.platform()},
    }
    lat = result["latency_ms"]
    print(f"{info['name']} ({info['backbone']}, {info['image_size']} px, batch {info['batch_size']}) on "
          f"{os.cpu_count()} cores, server torch threads {args.threads or 'default'}; load average before "
          f"{load_before[0]:.2f}, after {load_after[0]:.2f}")
    print(f"{result['requests_done']} requests, {args.concurrency} concurrent clients, 127.0.0.1: "
          f"{result['requests_per_s']:.1f} requests/s in {result['seconds']:.1f} s; latency p50 {lat['p50']:.0f} ms, "
          f"p95 {lat['p95']:.0f} ms, p99 {lat['p99']:.0f} ms, max {lat['max']:.0f} ms; errors {result['errors']}; "
          f"{report['mean_images_per_model_call']:.2f} images per model call; server peak RSS "
          f"{peak if peak is None else f'{peak:.0f} MiB'}")
    if direct:
        print("the model's own score in-process, same images: " +
              ", ".join(f"{rate:.1f} images/s ({label.replace('_', ' ')})" for label, rate in direct.items()))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 1 if result["errors"] or result["stopped_by_time_limit"] else 0


if __name__ == "__main__":
    sys.exit(main())
