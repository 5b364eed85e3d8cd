"""Report: the rows and facts of one evaluation, as JSON and Markdown, saved atomically."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from omniad.calibration import format_group_rates

# (key, column title) of the threshold-free table and of the calibrated-decision table.
RANKING_COLUMNS = [
    ("image_auroc", "I-AUROC"),
    ("image_ap", "I-AP"),
    ("image_f1max", "I-F1max"),
    ("pixel_auroc", "P-AUROC"),
    ("pixel_ap", "P-AP"),
    ("pixel_f1max", "P-F1max"),
    ("pixel_aupro", "AU-PRO"),
]
DECISION_COLUMNS = [
    ("precision", "precision"),
    ("recall", "recall"),
    ("f1", "F1"),
    ("false_alarm_rate", "false-alarm rate"),
    ("miss_rate", "miss rate"),
]
AGGREGATE_ROWS = ("mean", "mixed")


def json_values(value: Any) -> Any:
    """JSON-able copy: nan/inf -> None, numpy scalars/arrays -> Python values, tuples -> lists (reports and the
    service's answers)."""
    if isinstance(value, dict):
        return {str(k): json_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_values(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_values(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _percent(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{100.0 * float(value):.1f}"


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclass
class Report:
    """Result of ``omniad.metrics.evaluate``.

    Attributes:
        rows: row name -> metrics. One row per category (in data order), then ``"mean"`` (mean of the
            per-category values: the papers' unified setting) and ``"mixed"`` (all categories pooled, one
            ranking and one threshold: the absolute-unified setting). Metric values are fractions in [0, 1],
            nan where undefined; counts are ints.
        meta: protocol, detector, backbone, weights, image size, seed, wall times, memory, versions,
            threshold.
        scores: (N,) image scores of every test image, in data order (not written to JSON by default).
        labels: (N,) 0/1 ground truth.
        categories: category of each image.
        defect_types: defect type of each image ("good" for normals).
        paths: file of each image ("" for in-memory images).
        flagged: (N,) the calibrated decision of each image (None without a calibrated threshold).
    """

    rows: dict[str, dict[str, Any]]
    meta: dict[str, Any]
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    categories: list[str] = field(default_factory=list)
    defect_types: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    flagged: np.ndarray | None = None

    @property
    def category_names(self) -> list[str]:
        """Names of the per-category rows."""
        return [name for name in self.rows if name not in AGGREGATE_ROWS]

    def decisions(self) -> np.ndarray:
        """The calibrated decision of every image (made by the detector's ``Calibration.decide``)."""
        if self.flagged is None:
            raise ValueError("this report has no decisions: the detector had no calibrated threshold")
        return self.flagged

    def to_dict(self, include_scores: bool = False) -> dict[str, Any]:
        """Rows and meta as JSON-able values (nan -> None); per-image data only when ``include_scores``."""
        out: dict[str, Any] = {"meta": json_values(self.meta), "rows": json_values(self.rows)}
        if include_scores:
            out["images"] = {
                "scores": json_values(np.asarray(self.scores, dtype=np.float64)),
                "labels": json_values(np.asarray(self.labels)),
                "categories": list(self.categories),
                "defect_types": list(self.defect_types),
                "paths": list(self.paths),
            }
        return out

    def to_json(self, include_scores: bool = False, indent: int = 2) -> str:
        """``to_dict`` as a JSON string (strict JSON: undefined values are ``null``)."""
        return json.dumps(self.to_dict(include_scores), indent=indent, allow_nan=False)

    def to_markdown(self) -> str:
        """Header with the protocol and run facts, then the metric table and the calibrated-decision table."""
        m = self.meta
        setting = m.get("setting")
        anomalous = "anomalous" if setting else "defective"
        lines = [f"# omniad evaluation: {m.get('detector', '?')}", ""]
        facts = [
            ("detector", f"{m.get('detector')} {json.dumps(json_values(m.get('params', {})), sort_keys=True)}"),
            ("backbone", m.get("backbone")),
            ("weights", m.get("weights_source")),
            ("image size", m.get("image_size")),
            ("seed", m.get("seed")),
            (
                "test images",
                f"{m.get('n_images')} ({m.get('n_normal')} normal, {m.get('n_defective')} {anomalous})",
            ),
            ("fit wall time", _seconds(m.get("fit_seconds"))),
            ("fit peak memory", "-" if m.get("fit_peak_memory_mb") is None else f"{m['fit_peak_memory_mb']:.0f} MB"),
            (
                "scoring wall time",
                f"{_seconds(m.get('score_seconds'))} ({_rate(m.get('images_per_second'))})",
            ),
            ("evaluation wall time", _seconds(m.get("eval_seconds"))),
            ("peak memory (RSS)", f"{m.get('peak_rss_mb', float('nan')):.0f} MB"),
            ("device", m.get("device")),
            ("torch", m.get("torch_version")),
            ("threshold", f"{m.get('threshold')} ({m.get('threshold_source')})"),
        ]
        if m.get("calibration_clusters"):  # the held-out normals' false alarms, per cluster of the training images
            facts.append(("held-out normals flagged per cluster", format_group_rates(m["calibration_clusters"])))
        lines += [f"- **{k}**: {v}" for k, v in facts]
        if setting:
            lines += ["", f"**Setting.** {setting.get('description', '')}"]
        lines += ["", f"**Protocol.** {m.get('protocol', '')}", ""]
        if m.get("notes"):
            lines += [f"**Note.** {note}" for note in m["notes"]] + [""]

        lines.append("## Threshold-free metrics (%)")
        lines.append("")
        # no pixel ground truth anywhere (novelty sets, image-level categories): no columns of n/a
        pixel_gt = any(row.get("pixel_gt", True) for row in self.rows.values())
        columns = [(key, title) for key, title in RANKING_COLUMNS
                   if any(key in row for row in self.rows.values()) and (pixel_gt or not key.startswith("pixel_"))]
        head = ["normal class" if setting else "category", "normal", anomalous] + [title for _, title in columns]
        lines += _table(head, self._table_rows(columns, counts=True))
        lines += [
            "",
            f"## Decisions at one threshold for all categories: score > {m.get('threshold')} (%)",
            "",
        ]
        head = ["normal class" if setting else "category"] + [title for _, title in DECISION_COLUMNS]
        lines += _table(head, self._table_rows(DECISION_COLUMNS, counts=False))
        lines.append("")
        lines.append(
            "n/a: undefined (one class missing, or no calibrated threshold). Rows: as the setting says."
            if setting else
            "n/a: undefined (one class missing, no pixel ground truth, or no calibrated threshold). "
            "mean = mean over categories (unified setting); mixed = all categories pooled, one ranking "
            "and one threshold (absolute-unified setting)."
        )
        return "\n".join(lines) + "\n"

    def _table_rows(self, columns: list[tuple[str, str]], counts: bool) -> list[list[str]]:
        out = []
        for name, row in self.rows.items():
            label = f"**{name}**" if name in AGGREGATE_ROWS else name
            cells = [label]
            if counts:
                cells += [str(row.get("n_normal", "")), str(row.get("n_defective", ""))]
            cells += [_percent(row.get(key)) for key, _ in columns]
            out.append(cells)
        return out

    def save(self, folder: str | os.PathLike, include_scores: bool = False) -> Path:
        """Write ``report.json`` and ``report.md`` into ``folder`` (each atomically); returns the folder."""
        folder = Path(folder)
        atomic_write_text(folder / "report.json", self.to_json(include_scores))
        atomic_write_text(folder / "report.md", self.to_markdown())
        return folder


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return lines


def _seconds(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{float(value):.1f} s"


def _rate(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{float(value):.1f} images/s"
