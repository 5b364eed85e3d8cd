"""``predict``: score image files, folders or tensors with a fitted detector, decide at its one calibrated
threshold, and write the results (what ``omniad predict`` runs; the CLI only parses and prints).

Outputs when ``out`` is given, each file written atomically and the results last (a fresh ``results.json``
means a finished run):

    out/overlays/<name>  a heatmap overlay PNG per scored image, all on one colour scale (``report.overlay_scale``)
    out/results.csv      one row per input: path, score, anomalous, overlay, error
    out/results.json     the scored images, the threshold and where it came from, the method, the files that
                         could not be read and the entries of the input folders that were not images

Overlay names are unambiguous: an input file's path relative to the deepest folder holding every input file, as
folders under ``overlays/``, with ``.png`` appended to the full file name (extension included). So ``a.png`` and
``a.jpg`` give ``overlays/a.png.png`` and ``overlays/a.jpg.png``, ``sub/x.png`` and ``sub_x.png`` give
``overlays/sub/x.png.png`` and ``overlays/sub_x.png.png``. In-memory images are named by position:
``overlays/tensor_000003.png`` for ``tensor:3``.

Bad input never gives a silent wrong result: a file that cannot be read is listed with its reason and the
rest are scored; NaN or infinite scores are an error naming the files; a model without a calibrated threshold
makes no decisions (they are None) unless a threshold is given.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from omniad.calibration import Calibration
from omniad.data.images import IMAGE_EXTENSIONS, ImageReadError, read_image, to_uint8
from omniad.distributed import is_main, world
from omniad.monitor import AlarmCheck, calibration_counts, check_alarms
from omniad.report import _atomic_save, overlay_scale, save_overlay

RESULT_COLUMNS = ("path", "score", "anomalous", "overlay", "error")
_SHOWN = 10  # entries listed in a summary before "... and N more"


class InputIssue(NamedTuple):
    """An input that was not scored: a file that could not be read, or a folder entry that is not an image."""

    path: str
    reason: str


class PredictedImage(NamedTuple):
    """One scored image.

    Attributes:
        path: the file as given or found in a folder (``tensor:<i>`` for in-memory images).
        score: the image score (higher = more anomalous).
        anomalous: ``score > threshold``; None when there is no threshold.
        overlay: the overlay's path relative to ``out`` (e.g. ``overlays/sub/x.png.png``), or None.
    """

    path: str
    score: float
    anomalous: bool | None
    overlay: str | None


@dataclass
class Prediction:
    """What ``predict`` returns (and writes to ``results.json``).

    Attributes:
        results: the scored images, in input order.
        failed: the input files that could not be read, each with the reason; they were not scored.
        skipped: entries of the input folders that were not used (files that are not images by name, links to
            folders, the output folder), each with the reason.
        method: the detector's name.
        threshold: the decision threshold used, or None (the model has no calibrated threshold and none was
            given: no decisions).
        threshold_source: one line on where the threshold came from.
        calibration: the model's own calibration (None when it has none), whatever threshold was used.
        out: the output folder, or None when nothing was written.
        alarm_check: the run's alarm count tested against the calibrated false-alarm rate
            (``omniad.monitor``); None without a calibrated rate.
        runtime: what scored the images (the model's ``runtime_note``: torch, or an exported graph's runtime,
            precision and file).
    """

    results: list[PredictedImage]
    failed: list[InputIssue]
    skipped: list[InputIssue]
    method: str
    threshold: float | None
    threshold_source: str
    calibration: Calibration | None = None
    out: Path | None = None
    image_size: int | list[int] | None = field(default=None)
    alarm_check: AlarmCheck | None = None
    runtime: str = "torch"

    @property
    def scores(self) -> np.ndarray:
        """(N,) image scores of the scored images (float64)."""
        return np.array([r.score for r in self.results], dtype=np.float64)

    @property
    def decisions(self) -> np.ndarray | None:
        """(N,) boolean decisions, or None when there is no threshold."""
        if self.threshold is None:
            return None
        return np.array([bool(r.anomalous) for r in self.results], dtype=bool)

    @property
    def n_flagged(self) -> int | None:
        """How many images were flagged anomalous; None when there is no threshold."""
        decisions = self.decisions
        return None if decisions is None else int(decisions.sum())

    def to_dict(self) -> dict[str, Any]:
        """The content of ``results.json`` (JSON-able; no NaN)."""
        return {
            "method": self.method,
            "image_size": self.image_size,
            "runtime": self.runtime,
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "calibration": None if self.calibration is None else self.calibration.describe(),
            "n_scored": len(self.results),
            "n_flagged": self.n_flagged,
            "n_failed": len(self.failed),
            "alarm_check": None if self.alarm_check is None else self.alarm_check.to_dict(),
            "results": [r._asdict() for r in self.results],
            "failed": [f._asdict() for f in self.failed],
            "skipped": [s._asdict() for s in self.skipped],
        }

    def summary(self) -> str:
        """A few lines for people: counts, the threshold and its source, every file that failed."""
        lines = [f"{len(self.results)} images scored with {self.method}; " + self._decision_line(),
                 f"runtime: {self.runtime}"]
        if self.alarm_check is not None and self.alarm_check.departed:
            lines.append(self.alarm_check.message())
        if self.out is not None:
            lines.append(f"results in {self.out / 'results.csv'} and {self.out / 'results.json'}")
        if self.failed:
            lines.append(f"{len(self.failed)} input files could not be read and were not scored:")
            lines += [f"  {f.path}: {f.reason}" for f in self.failed]  # every one: each needs fixing
        if self.skipped:
            lines.append(f"{len(self.skipped)} entries of the input folders were not used:")
            lines += [f"  {s.path}: {s.reason}" for s in self.skipped[:_SHOWN]]
            if len(self.skipped) > _SHOWN:
                lines.append(f"  ... and {len(self.skipped) - _SHOWN} more (all in results.json)")
        return "\n".join(lines)

    def _decision_line(self) -> str:
        if self.threshold is None:
            return (
                "no decisions: the model has no calibrated threshold (fit it with calibration_fraction > 0, "
                "or give a threshold: --threshold on the command line, threshold= in Python)"
            )
        return f"{self.n_flagged} flagged anomalous at {self.threshold_source}"


class _Item(NamedTuple):
    name: str
    path: Path | None
    image: Tensor | None
    overlay: str


def decision_rule(calibration: Calibration | None, threshold: float | None) -> tuple[Calibration | None, str]:
    """The rule ``predict`` decides with: the model's calibration, or a copy of it at a threshold given by the
    user (whose ``target_far`` is then the share of the calibration's normal images that threshold flags).

    Returns:
        (rule, one line saying where its threshold comes from); rule is None when there is no threshold.

    Raises:
        ValueError: ``threshold`` is NaN or infinite.
    """
    if threshold is None:
        if calibration is None:
            return None, "none: the model has no calibrated threshold"
        return calibration, calibration.describe()
    value = float(threshold)
    if not math.isfinite(value):
        raise ValueError(f"the threshold must be a finite number, got {threshold!r}")
    if calibration is None:
        # a bare rule: no normal scores to report a false-alarm rate on
        rule = Calibration(value, float("nan"), np.empty(0), "given by the user")
        return rule, f"threshold {value:.6g} given by the user (the model has no calibrated threshold)"
    far = calibration.false_alarm_rate(value)
    rule = dataclasses.replace(calibration, threshold=value, target_far=far, source="given by the user")
    return rule, (
        f"threshold {value:.6g} given by the user, overriding the model's calibrated {calibration.threshold:.6g}; "
        f"it flags {far:.1%} of the model's {calibration.normal_scores.size} held-out normal images "
        f"(the calibrated one aims at {calibration.target_far:g})"
    )


def collect_inputs(inputs: Any, exclude: str | os.PathLike | None = None) -> tuple[list[Path], list[InputIssue]]:
    """The image files named by ``inputs`` (files and folders), and the folder entries not used.

    Folders are searched recursively (links to folders are not followed, to avoid loops) for files named
    ``*.png .jpg .jpeg .bmp .tif .tiff`` (any case), in name order. A file given by name is used whatever its
    extension; the same file given twice is used once.

    Args:
        inputs: a path or a sequence of paths.
        exclude: a folder never searched (the output folder, so that a second run does not score the first
            run's overlays).

    Returns:
        (files, skipped): skipped lists other files, links to folders and the excluded folder, with reasons.

    Raises:
        FileNotFoundError: an input does not exist.
        ValueError: an input folder holds no image files.
    """
    paths = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    excluded = os.path.realpath(exclude) if exclude is not None else None
    files: list[Path] = []
    skipped: list[InputIssue] = []
    seen: set[str] = set()
    for item in paths:
        path = Path(item)
        if path.is_dir():
            found = _walk(path, excluded, skipped)
            if not found:
                raise ValueError(f"{path}: folder holds no image files ({' '.join(IMAGE_EXTENSIONS)})")
        elif path.is_file() or path.is_symlink():  # a broken link is listed as failed when it is read
            found = [path]
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
        for file in found:
            key = os.path.abspath(file)
            if key not in seen:
                seen.add(key)
                files.append(file)
    return files, skipped


def _walk(folder: Path, excluded: str | None, skipped: list[InputIssue]) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        kept = []
        for name in sorted(dirnames):
            sub = here / name
            if sub.is_symlink():
                skipped.append(InputIssue(str(sub), "link to a folder, not followed (give it as an input of its own)"))
            elif excluded is not None and os.path.realpath(sub) == excluded:
                skipped.append(InputIssue(str(sub), "the output folder of this run"))
            else:
                kept.append(name)
        dirnames[:] = kept  # os.walk descends into what is left, in this order
        for name in sorted(filenames):
            path = here / name
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                found.append(path)
            else:
                skipped.append(InputIssue(str(path), f"not an image file name ({' '.join(IMAGE_EXTENSIONS)})"))
    return found


def overlay_names(files: Sequence[Path]) -> list[str]:
    """Overlay file names (relative to ``out``) of input files: see the module docstring.

    The path relative to the deepest common folder is unique per file, and appending ``.png`` to the whole name
    keeps it unique (``a.png`` and ``a.jpg`` stay apart).
    """
    if not files:
        return []
    absolute = [os.path.abspath(f) for f in files]
    common = os.path.commonpath([os.path.dirname(a) for a in absolute])
    return [f"overlays/{Path(os.path.relpath(a, common)).as_posix()}.png" for a in absolute]


def _items(detector: Any, inputs: Any, exclude: Path | None) -> tuple[list[_Item], list[InputIssue]]:
    """Files and in-memory images as one list in the order given, each with its overlay name."""
    if isinstance(inputs, (Tensor, str, os.PathLike)):
        inputs = [inputs]
    entries: list[Path | Tensor] = []
    skipped: list[InputIssue] = []
    seen: set[str] = set()
    for item in inputs:
        if isinstance(item, Tensor):
            entries += list(item.unbind(0)) if item.dim() == 4 else [item]
        elif isinstance(item, (str, os.PathLike)):
            files, skips = collect_inputs([item], exclude)
            skipped += skips
            for file in files:  # the same file given twice (in a folder and by name) is scored once
                if os.path.abspath(file) not in seen:
                    seen.add(os.path.abspath(file))
                    entries.append(file)
        else:
            raise TypeError(f"predict reads file or folder paths and image tensors, got a {type(item).__name__}")
    if not entries:
        raise ValueError("predict was given no inputs")
    names = iter(overlay_names([e for e in entries if isinstance(e, Path)]))
    items: list[_Item] = []
    for entry in entries:
        if isinstance(entry, Path):
            items.append(_Item(str(entry), entry, None, next(names)))
            continue
        index = sum(1 for i in items if i.path is None)
        name = f"tensor:{index}"
        try:
            image = detector.preprocess(entry)[0]  # the detector's own checks: shape, float, [0, 1]
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name}: {err}") from None
        items.append(_Item(name, None, image, f"overlays/tensor_{index:06d}.png"))
    overlays = [i.overlay for i in items]
    if len(set(overlays)) != len(overlays):  # only a file named like a tensor's overlay (tensor_000001) can
        clash = next(i for i in items if overlays.count(i.overlay) > 1)
        raise ValueError(f"two inputs would share the overlay {clash.overlay}; rename {clash.name}")
    return items, skipped


def predict(
    detector: Any,
    inputs: Any,
    out: str | os.PathLike | None = None,
    *,
    overlays: bool = True,
    threshold: float | None = None,
    progress: bool | None = None,
    batch_size: int | None = None,
    readers: int | None = None,
    draft: bool = True,
) -> Prediction:
    """Score images with a fitted detector and decide at its calibrated threshold (or at ``threshold``).

    Args:
        detector: a fitted detector (``score``, ``image_size``; ``calibration_`` for decisions).
        inputs: image file or folder paths (folders searched recursively), or a (N, 3, H, W) tensor / list of
            (3, H, W) tensors with values in [0, 1]; a mix of paths and tensors is allowed. Images are resized to
            ``detector.image_size``. Results keep the order given (folders in name order).
        out: folder for results.csv, results.json and overlays/ (created); None: write nothing.
        overlays: write a heatmap overlay per scored image (only with ``out``).
        threshold: decide at this threshold instead of the model's calibrated one.
        progress: show a progress bar (default: ``detector.progress``).
        batch_size: images per ``score`` call (default: ``detector.batch_size``).
        readers: threads that decode and resize the next batches while the model scores this one; 0 reads on the
            calling thread. Default: 0 for a torch model on the CPU (measured on 2 cores, PaDiM at 256 px: 32
            images/s reading inline, 18-23 with 1-4 reader threads, which compete with torch's own threads), the
            model's ``default_readers`` when it has one (an exported file: 2), at most 4 on a GPU, which leaves the
            CPU cores free to decode. At most two batches wait, read, in memory.
        draft: decode a JPEG file at least twice the model's input size on both sides at a reduced scale (1/2,
            1/4 or 1/8: libjpeg's DCT scaling, ``read_image``) before the usual resize; the datasets draft by
            default too, so training and prediction pre-process alike. False: full decoding, for pre-processing
            bit-identical to ``resize_image(read_image(path), size)``. Tiled models read files at their own size
            and in-memory images are not decoded: neither is drafted.

    Returns:
        A ``Prediction``: the scored images, the files that could not be read (with reasons), the threshold
        and its source. Unreadable files are listed, not raised: the other images are still scored.

    Raises:
        ValueError: no input could be read, an image's score is NaN or infinite (naming the files; nothing is
            written), a folder holds no images, a bad in-memory image, a non-finite ``threshold``.
        FileNotFoundError: an input path does not exist.
    """
    calibration = getattr(detector, "calibration_", None)
    rule, source = decision_rule(calibration, threshold)
    out_path = None if out is None else Path(out)
    items, skipped = _items(detector, inputs, out_path)
    rank, processes = world()
    mine = items[rank::processes]  # under torchrun each process scores a strided share; results are gathered
    # how files are read: the model's input size, or (tiled / aspect kept) a rule; exported files: their side
    size = getattr(detector, "read_size", detector.image_size)
    batch_size = int(batch_size or getattr(detector, "batch_size", 16) or 16)
    if batch_size < 1 or (readers is not None and readers < 0):
        raise ValueError(f"predict needs batch_size >= 1 and readers >= 0, got {batch_size} and {readers}")
    show = getattr(detector, "progress", False) if progress is None else progress
    draw = overlays and out_path is not None

    names: list[str] = []
    scores: list[float] = []
    overlay_of: list[str | None] = []
    failed: list[InputIssue] = []
    with contextlib.ExitStack() as stack:
        spill = None
        if draw:
            # maps and images wait on disk until the colour scale of the whole run is known: memory stays at
            # one batch however many images there are
            out_path.mkdir(parents=True, exist_ok=True)
            spill = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=".predict-", dir=out_path)))
        if readers is None:  # the model's own preference (an exported file's runtime), else by device
            on_gpu = str(getattr(detector, "device_", "cpu")).startswith("cuda")
            readers = getattr(detector, "default_readers", min(4, os.cpu_count() or 1) if on_gpu else 0)
        if getattr(detector, "min_score_batch", 1) > 1:  # a mutual scorer (musc): every image in one call
            batch_size = max(1, len(mine))
        chunks = _chunks(mine, batch_size, show and is_main())
        # an exported graph takes uint8: its files are read so, a third less work than floats (``read_image``)
        dtype = getattr(detector, "read_dtype", torch.float32)
        for number, loaded in enumerate(_loaded_chunks(chunks, size, readers, draft, dtype)):
            good, images = [], []
            for item, image, issue in loaded:
                if issue is not None:
                    failed.append(issue)
                else:
                    good.append(item)
                    images.append(image)
            for part, (run, run_images) in enumerate(_same_size_runs(good, images)):  # one run unless sizes differ
                batch = torch.stack(run_images)
                result = detector.score(batch)
                values = result.image_scores.detach().double().cpu().reshape(-1).numpy()
                if values.size != len(run):
                    raise ValueError(
                        f"{type(detector).__name__}.score returned {values.size} scores for {len(run)} images"
                    )
                names += [i.name for i in run]
                scores += values.tolist()
                overlay_of += [i.overlay if draw else None for i in run]
                if spill is not None:
                    np.savez(
                        spill / f"{number:08d}-{part:04d}.npz",
                        images=to_uint8(batch).numpy(),
                        maps=result.anomaly_maps.detach().float().cpu().numpy(),
                        overlays=np.array([i.overlay for i in run]),
                    )
        if processes > 1:
            names, scores, overlay_of, failed = _gather_in_order(items, names, scores, overlay_of, failed)
        check_finite_scores(names, scores)
        if not names:
            listed = "; ".join(f"{f.path}: {f.reason}" for f in failed)
            raise ValueError(f"none of the {len(failed)} input files could be read: {listed}")
        decisions: list[bool | None] = [None] * len(names)
        if rule is not None:
            decisions = [bool(d) for d in rule.decide(np.asarray(scores))]
        if spill is not None:
            _write_overlays(spill, out_path, None if rule is None else rule.threshold)

    alarm_check = None
    counts = None if rule is None else calibration_counts(rule)
    if counts is not None:
        alarm_check = check_alarms(len(decisions), int(sum(bool(d) for d in decisions)), *counts)
    prediction = Prediction(
        results=[PredictedImage(*row) for row in zip(names, scores, decisions, overlay_of, strict=True)],
        failed=failed,
        skipped=skipped,
        method=getattr(detector, "name", type(detector).__name__),
        threshold=None if rule is None else rule.threshold,
        threshold_source=source,
        calibration=calibration,
        out=out_path,
        image_size=_jsonable_size(detector.image_size),
        alarm_check=alarm_check,
        runtime=getattr(detector, "runtime_note", "torch"),
    )
    if out_path is not None and is_main():
        write_results(prediction, out_path)
    return prediction


def _gather_in_order(items: list[_Item], *lists: list) -> tuple[list, ...]:
    """Every process's results (names, scores, overlays, failures), joined in the order of ``items``."""
    import torch.distributed as dist

    gathered: list[Any] = [None] * world()[1]
    dist.all_gather_object(gathered, lists)
    position = {item.name: i for i, item in enumerate(items)}
    names, scores, overlays, failed = ([] for _ in range(4))
    for part_names, part_scores, part_overlays, part_failed in gathered:
        names += part_names
        scores += part_scores
        overlays += part_overlays
        failed += part_failed
    order = sorted(range(len(names)), key=lambda i: position[names[i]])
    failed.sort(key=lambda f: position.get(f.path, len(items)))
    return [names[i] for i in order], [scores[i] for i in order], [overlays[i] for i in order], failed


def _same_size_runs(items: list[_Item], images: list[Tensor]) -> Iterator[tuple[list[_Item], list[Tensor]]]:
    """Consecutive runs of images of one size and type (read at their own size for tiling, sizes may differ;
    in-memory float images beside files read as uint8 for an exported graph)."""
    start = 0
    for end in range(1, len(images) + 1):
        if end == len(images) or (images[end].shape, images[end].dtype) != (images[start].shape,
                                                                            images[start].dtype):
            yield items[start:end], images[start:end]
            start = end


def _jsonable_size(size: Any) -> Any:
    return [int(v) for v in size] if isinstance(size, (tuple, list)) else int(size)


def _load(item: _Item, size: Any, draft: bool = True, dtype: torch.dtype = torch.float32
          ) -> tuple[_Item, Tensor | None, InputIssue | None]:
    """One input read and resized to ``size`` (None: kept at its own size; in-memory images are ready), or the
    reason it cannot be."""
    if item.image is not None:
        return item, item.image, None
    try:
        return item, read_image(item.path, size, draft=draft, dtype=dtype), None
    except (ImageReadError, OSError) as err:
        return item, None, InputIssue(item.name, _reason(err, item.path))


def _loaded_chunks(chunks: Iterable[list[_Item]], size: Any, workers: int, draft: bool = True,
                   dtype: torch.dtype = torch.float32) -> Iterator[list[tuple]]:
    """Each chunk's inputs loaded (``_load``), by a bounded pool of reader threads that works on the next chunks
    while the caller scores this one: decoding and resizing (PIL and torch release the GIL) overlap scoring."""
    if workers <= 0:
        for chunk in chunks:
            yield [_load(item, size, draft, dtype) for item in chunk]
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="omniad-reader") as pool:
        waiting: deque[list[Future]] = deque()
        for chunk in chunks:
            waiting.append([pool.submit(_load, item, size, draft, dtype) for item in chunk])
            if len(waiting) > 2:  # bounded: the chunk being scored and two read ahead
                yield [f.result() for f in waiting.popleft()]
        while waiting:
            yield [f.result() for f in waiting.popleft()]


def _chunks(items: list[_Item], size: int, progress: bool) -> Iterator[list[_Item]]:
    starts = range(0, len(items), size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="predict", unit="batch", leave=False)
    for start in starts:
        yield items[start : start + size]


def _reason(err: Exception, path: Path) -> str:
    """The error without the ``<path>: `` prefix the readers put first (the path is listed beside it)."""
    text = str(err)
    prefix = f"{path}: "
    return text[len(prefix) :] if text.startswith(prefix) else text


def check_finite_scores(names: Sequence[str], scores: Sequence[float]) -> None:
    """Refuse NaN or infinite image scores, naming the images (predict and the service alike): no decision can
    be made on them, so nothing is written or answered."""
    bad = [name for name, score in zip(names, scores, strict=True) if not math.isfinite(float(score))]
    if bad:
        shown = ", ".join(bad[:_SHOWN]) + (f", ... ({len(bad)} in all)" if len(bad) > _SHOWN else "")
        raise ValueError(
            f"{len(bad)} of {len(scores)} image scores are NaN or infinite, so no decision can be made on them "
            f"and nothing was written: {shown}"
        )


def _write_overlays(spill: Path, out: Path, threshold: float | None) -> None:
    parts = sorted(spill.glob("*.npz"))
    if world()[1] > 1:  # one colour scale over every process's maps: their ranges, then the threshold
        low, high = overlay_scale(_stored_maps(parts)) if parts else (math.inf, -math.inf)
        ranges = [None] * world()[1]
        import torch.distributed as dist

        dist.all_gather_object(ranges, (low, high))
        vmin, vmax = overlay_scale(np.array([v for pair in ranges for v in pair if math.isfinite(v)]), threshold)
    else:
        vmin, vmax = overlay_scale(_stored_maps(parts), threshold)
    for part in parts:
        with np.load(part) as stored:
            for image, amap, name in zip(stored["images"], stored["maps"], stored["overlays"], strict=True):
                save_overlay(image.astype(np.float32) / 255.0, amap, out / str(name), vmin=vmin, vmax=vmax)


def _stored_maps(parts: list[Path]) -> Iterator[np.ndarray]:
    for part in parts:
        with np.load(part) as stored:
            yield stored["maps"]


def write_results(prediction: Prediction, out: str | os.PathLike) -> None:
    """Write ``results.csv`` (one row per input, the unreadable ones with their error) and ``results.json``,
    each atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=RESULT_COLUMNS)
    writer.writeheader()
    for r in prediction.results:
        anomalous = "" if r.anomalous is None else str(r.anomalous)
        writer.writerow({"path": r.path, "score": repr(r.score), "anomalous": anomalous, "overlay": r.overlay or "",
                         "error": ""})
    for f in prediction.failed:
        writer.writerow({"path": f.path, "score": "", "anomalous": "", "overlay": "", "error": f.reason})
    text = buffer.getvalue()
    _atomic_save(out / "results.csv", lambda tmp: Path(tmp).write_text(text, newline=""))
    payload = json.dumps(prediction.to_dict(), indent=2, allow_nan=False)
    _atomic_save(out / "results.json", lambda tmp: Path(tmp).write_text(payload))


__all__ = ["InputIssue", "PredictedImage", "Prediction", "collect_inputs", "decision_rule", "overlay_names",
           "predict", "write_results"]
