"""What the benchmark scripts share: where the real data lives and how ``--param KEY=VALUE`` is read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omniad.cli import parse_value

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
