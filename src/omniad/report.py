"""Pictures for reports: anomaly-map overlays (numpy + Pillow only) and per-category score histograms
(matplotlib, an optional extra: ``pip install 'omniad[plots]'``).

Evaluation tables and their JSON / Markdown live in ``omniad.metrics`` (``evaluate`` -> ``Report``).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def jet(values: np.ndarray) -> np.ndarray:
    """Jet-like colormap: values in [0, 1] -> RGB in [0, 1] (dark blue, blue, cyan, yellow, red, dark red).

    Args:
        values: array of any shape; clipped to [0, 1].

    Returns:
        Array of shape ``values.shape + (3,)``, float32.
    """
    x = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)[..., None]
    centres = np.array([3.0, 2.0, 1.0], dtype=np.float32)  # red, green, blue peak at x = 3/4, 1/2, 1/4
    return np.clip(1.5 - np.abs(4.0 * x - centres), 0.0, 1.0)


def _to_numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):
        array = array.detach().float().cpu().numpy()
    return np.asarray(array, dtype=np.float32)


def overlay_heatmap(
    image: Any,
    amap: Any,
    vmin: float | None = None,
    vmax: float | None = None,
    alpha: float = 0.5,
) -> Image.Image:
    """Blend an anomaly map, coloured with ``jet``, over its image.

    Args:
        image: (3, H, W) (or (1, H, W) / (H, W) grey) tensor or array with values in [0, 1].
        amap: (h, w) anomaly map; resized (bilinear) to the image size when it differs.
        vmin: map value drawn dark blue; default the map's minimum. Pass fixed ``vmin``/``vmax`` (e.g. from
            the normal scores and the threshold) to make overlays of different images comparable.
        vmax: map value drawn dark red; default the map's maximum.
        alpha: weight of the heatmap in the blend (0 = image only, 1 = heatmap only).

    Returns:
        An RGB ``PIL.Image`` of size (W, H).
    """
    img = _to_numpy(image)
    if img.ndim == 2:
        img = img[None]
    if img.ndim != 3 or img.shape[0] not in (1, 3):
        raise ValueError(f"image must be (3, H, W), (1, H, W) or (H, W), got shape {img.shape}")
    if img.shape[0] == 1:
        img = np.repeat(img, 3, axis=0)
    heat = _to_numpy(amap)
    if heat.ndim == 3 and heat.shape[0] == 1:
        heat = heat[0]
    if heat.ndim != 2:
        raise ValueError(f"anomaly map must be (H, W), got shape {heat.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    height, width = img.shape[1:]
    if heat.shape != (height, width):
        heat = np.asarray(Image.fromarray(heat).resize((width, height), Image.BILINEAR))
    lo = float(np.min(heat)) if vmin is None else float(vmin)
    hi = float(np.max(heat)) if vmax is None else float(vmax)
    scaled = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
    blended = (1.0 - alpha) * np.clip(img, 0.0, 1.0).transpose(1, 2, 0) + alpha * jet(scaled)
    return Image.fromarray(np.round(blended * 255.0).astype(np.uint8))


def overlay_scale(maps: Any, threshold: float | None = None) -> tuple[float, float]:
    """The one colour scale of a set of overlays (``omniad predict`` and ``omniad demo`` both use it).

    The scale spans the smallest to the largest map value of the whole set, widened to include the decision
    threshold: overlays of different images are comparable, and when no map reaches the threshold (nothing
    flagged) nothing is drawn dark red. Min and max (not percentiles) so that it can be computed batch by batch.

    Args:
        maps: anomaly maps (tensor or array of any shape), or an iterable of such batches.
        threshold: the decision threshold in map units (image scores pool map values); None or NaN: none.

    Returns:
        (vmin, vmax) for ``overlay_heatmap`` / ``save_overlay``; non-finite map values are ignored, and a set
        without finite values gives (0, 1).
    """
    batches = [maps] if hasattr(maps, "shape") else maps
    low, high = math.inf, -math.inf
    for batch in batches:
        values = _to_numpy(batch)
        values = values[np.isfinite(values)]
        if values.size:
            low, high = min(low, float(values.min())), max(high, float(values.max()))
    if threshold is not None and math.isfinite(threshold):
        low, high = min(low, float(threshold)), max(high, float(threshold))
    if not (math.isfinite(low) and math.isfinite(high)):
        return 0.0, 1.0
    return low, high


def _atomic_save(path: str | os.PathLike, write) -> Path:
    """Call ``write(temp_path)`` on a temporary file beside ``path``, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix or ".png")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_overlay(
    image: Any,
    amap: Any,
    path: str | os.PathLike,
    vmin: float | None = None,
    vmax: float | None = None,
    alpha: float = 0.5,
) -> Path:
    """Write ``overlay_heatmap(image, amap, vmin, vmax, alpha)`` to ``path`` atomically (format by suffix)."""
    overlay = overlay_heatmap(image, amap, vmin=vmin, vmax=vmax, alpha=alpha)
    image_format = Image.registered_extensions().get(Path(path).suffix.lower(), "PNG")
    return _atomic_save(path, lambda tmp: overlay.save(tmp, format=image_format))


def score_histograms(
    scores: Any,
    labels: Any,
    categories: Sequence[str],
    path: str | os.PathLike,
    title: str | None = None,
    threshold: float | None = None,
    bins: int = 30,
) -> Path:
    """Histograms of normal vs defective image scores: one panel per category and a pooled panel.

    All panels share the same bins and x-axis, so one sees whether the categories' normal scores line up
    (what one threshold for all needs) or sit at different heights.

    Args:
        scores: (N,) image scores.
        labels: (N,) 0 = normal, 1 = defective.
        categories: category of each image.
        path: image file to write (PNG, PDF, SVG, ... by suffix); written atomically.
        title: figure title.
        threshold: draw this decision threshold as a vertical line in every panel.
        bins: number of histogram bins.

    Returns:
        The path written.

    Raises:
        ImportError: when matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "score_histograms needs matplotlib, an optional extra: pip install 'omniad[plots]' "
            "(or pip install matplotlib)"
        ) from error
    values = _to_numpy(scores).astype(np.float64).reshape(-1)
    truth = np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels).reshape(-1).astype(int)
    cats = np.asarray(list(categories), dtype=object)
    if not (values.size == truth.size == cats.size):
        raise ValueError(
            f"scores, labels and categories differ in length: {values.size}, {truth.size}, {cats.size}"
        )
    if values.size == 0:
        raise ValueError("no scores to plot")
    names = list(dict.fromkeys(cats.tolist()))
    panels = [(name, cats == name) for name in names] + [
        ("all categories (mixed)", np.ones(values.size, bool))
    ]
    edges = np.histogram_bin_edges(values, bins=bins)
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    figure = Figure(figsize=(4.0 * columns, 3.0 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False, sharex=True)
    for ax, (name, chosen) in zip(axes.ravel()[: len(panels)], panels, strict=True):
        normal, defect = values[chosen & (truth == 0)], values[chosen & (truth == 1)]
        ax.hist(normal, bins=edges, alpha=0.6, color="tab:blue", label=f"normal ({normal.size})")
        ax.hist(defect, bins=edges, alpha=0.6, color="tab:red", label=f"defective ({defect.size})")
        if threshold is not None and np.isfinite(threshold):
            ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label="threshold")
        ax.set_title(name)
        ax.set_xlabel("image score")
        ax.tick_params(labelbottom=True)  # sharex hides them on upper rows; every panel should read alone
        ax.set_ylabel("images")
        ax.legend(fontsize="small")
    for ax in axes.ravel()[len(panels) :]:
        ax.set_visible(False)
    if title:
        figure.suptitle(title)
    suffix = Path(path).suffix.lower().lstrip(".") or "png"
    return _atomic_save(path, lambda tmp: figure.savefig(tmp, format=suffix, dpi=100))
