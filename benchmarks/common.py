"""What the benchmark scripts share: where the real data lives, how ``--param KEY=VALUE`` is read, and how
scores computed earlier (from a feature cache, or several score variants of one pass) become a ``Report``."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omniad.cli import parse_value
from omniad.metrics import ScoredSet
from omniad.types import AnomalyScores, Sample

# ../shared/data/industrial beside the repository (the real two-type set; benchmarks only, never a dependency)
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "industrial"


def parse_params(items: list[str]) -> dict[str, Any]:
    """``["lr=1e-4", "layers=[1, 2]"]`` -> ``{"lr": 0.0001, "layers": (1, 2)}``: values as
    ``omniad.cli.parse_value`` reads them, lists as tuples (the detectors' sequence parameters are tuples).
    Keys may be dotted (``pmad.epochs``); callers split them."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--param expects KEY=VALUE, got {item!r}")
        parsed = parse_value(value)
        params[key.strip()] = tuple(parsed) if isinstance(parsed, list) else parsed
    return params


def light_sample(sample: Sample, has_mask: bool | None = None) -> Sample:
    """``sample`` without its pixels (a (3, 1, 1) zero image): the labels, mask and metadata that a report of
    stored scores needs. ``has_mask`` overrides the sample's own flag."""
    return Sample(torch.zeros(3, 1, 1), sample.mask, sample.label, sample.category, sample.defect_type, sample.path,
                  sample.has_mask if has_mask is None else has_mask)


def batch_samples(batch: Any) -> list[Sample]:
    """The samples of an ``omniad.data.sources.SampleBatch`` without their pixels, masks kept as booleans."""
    return [Sample(torch.zeros(3, 1, 1), batch.masks[i] > 0.5, int(batch.labels[i]), batch.categories[i],
                   batch.defect_types[i], batch.paths[i], bool(batch.has_mask[i])) for i in range(len(batch))]


def scored_set(samples: Sequence[Sample], scores: AnomalyScores, pixels: bool = True,
               score_seconds: float = 0.0) -> ScoredSet:
    """A ``ScoredSet`` (what ``omniad.metrics.report_from_scores`` reads) from scores computed earlier.

    Args:
        samples: the labelled test samples, in the order of ``scores`` (their images are not read).
        scores: the image scores and anomaly maps of those samples.
        pixels: False leaves maps and masks out, so the report's pixel metrics are n/a (and cost nothing).
        score_seconds: time the scores took, for the report's throughput.

    Returns:
        The scored set.
    """
    n = len(samples)
    if scores.image_scores.shape[0] != n:
        raise ValueError(f"{scores.image_scores.shape[0]} stored scores for {n} samples")
    maps = masks = has_mask = None
    if pixels:
        maps = scores.anomaly_maps.detach().float().cpu().numpy()
        masks = np.stack([(s.mask > 0.5).numpy() for s in samples])
        has_mask = np.array([bool(s.has_mask) for s in samples])
    return ScoredSet(
        scores.image_scores.detach().double().cpu().numpy(),
        np.array([int(s.label) for s in samples]),
        [s.category for s in samples],
        maps, masks, has_mask,
        [s.defect_type for s in samples],
        [s.path for s in samples],
        score_seconds,
    )


def summarised(to_markdown: Callable[[dict], str]) -> bool:
    """``--summarise FILE`` on the command line: print the table of that results file instead of running (True)."""
    if sys.argv[1:2] != ["--summarise"]:
        return False
    print(to_markdown(json.loads(Path(sys.argv[2]).read_text())), end="")
    return True


def pct(value: Any) -> str:
    """A share as a percentage with one decimal ("n/a" for None, NaN or infinity)."""
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def publish(lines: Sequence[str], out: str | None) -> None:
    """Print a Markdown result and write it to ``out`` when given."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        Path(out).write_text(text)


def peak_rss_mib(pid: int | str = "self") -> float | None:
    """A process's peak resident set size (VmHWM; exec starts it afresh), in MiB; None where /proc is not there."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None
