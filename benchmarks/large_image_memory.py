"""Peak resident memory and time of scoring one 6000 x 6000 image with a tiled PaDiM (lite0 offline weights, tile
256, stride 256: 576 tiles), fitted on 8 synthetic 600 x 600 images; tiles are scored ``batch_size`` at a time.

    python benchmarks/large_image_memory.py
"""

from __future__ import annotations

import resource
import time

import torch

from omniad import create_detector


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    g = torch.Generator().manual_seed(0)
    det = create_detector("padim", image_size=256, tile_size=256, tile_stride=256, weights="offline", device="cpu",
                          progress=False, calibration_fraction=0.0)
    det.fit([(0.5 + 0.05 * torch.randn(3, 600, 600, generator=g)).clamp(0, 1) for _ in range(8)])
    after_fit = peak_mib()
    image = (0.5 + 0.05 * torch.randn(1, 3, 6000, 6000, generator=g)).clamp(0, 1)
    started = time.perf_counter()
    result = det.score(image)
    print(f"map {tuple(result.anomaly_maps.shape)}; {time.perf_counter() - started:.0f} s; peak RSS MiB: after "
          f"the fit {after_fit:.0f}, after scoring {peak_mib():.0f}")


if __name__ == "__main__":
    main()
