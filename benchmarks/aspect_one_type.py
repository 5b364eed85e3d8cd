"""Aspect kept against squashed for ONE type (a one-type PaDiM model, lite0 offline, 60 training images): whether
the (height, width) image_size helps where every image has the same orientation (kolektor: portrait, ~500 x 1260),
unlike the unified two-type model of benchmarks/tiling.py, where kolektor's portrait and the magnetic tiles'
landscape images share one padded box.

    python benchmarks/aspect_one_type.py --category kolektor
"""

from __future__ import annotations

import argparse

import torch
from common import DEFAULT_DATA
from torch.utils.data import Subset

from omniad import create_detector, evaluate
from omniad.data import MVTecDataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--category", default="kolektor")
    parser.add_argument("--train", type=int, default=60, help="the first N training images")
    parser.add_argument("--box", type=int, nargs=2, default=(640, 256), metavar=("HEIGHT", "WIDTH"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    for size in (256, tuple(args.box)):
        det = create_detector("padim", image_size=size, weights="offline", device="cpu", progress=False)
        train = MVTecDataset(DEFAULT_DATA, categories=[args.category], split="train", image_size=det.read_size)
        test = MVTecDataset(DEFAULT_DATA, categories=[args.category], split="test", image_size=det.read_size)
        det.fit(Subset(train, range(min(args.train, len(train)))))
        row = evaluate(det, test, progress=False).rows[args.category]
        print(f"image_size {size}: image AUROC {100 * row['image_auroc']:.1f}, pixel AUROC "
              f"{100 * row['pixel_auroc']:.1f}, AU-PRO {100 * row['pixel_aupro']:.1f}", flush=True)


if __name__ == "__main__":
    main()
