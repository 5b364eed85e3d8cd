"""A small synthetic multi-type defect dataset in the MVTec layout, deterministic from a seed.

Four product types, each with its own look, colour and noise level, so that the normal score distributions of
a detector differ between types (what score alignment has to fix):

- ``weave``: a woven texture (periodic, tan), rotated and shifted slightly per image, low noise.
- ``granite``: a speckled stone texture (grey/pink value noise), a new realisation per image, high noise.
- ``washer``: a shaded metal ring on a dark background, jittered in position, radius and light direction.
- ``bracket``: a copper L-shaped plate with two holes on a light background, jittered in position and angle.

Every image also gets a random gain and lighting gradient. Defect types (the ``test/<type>`` folder names):
``scratch`` (a thin bright or dark line), ``spot`` (a small dark disc), ``hole`` (a disc showing what is
behind the part), ``stain`` (a faint irregular tinted blob). On objects, defects lie on the part.

Each defective image is its normal render with an overlay painted on top; the mask is exactly the set of
pixels whose 8-bit value differs from the normal render (``render_sample`` returns both, so tests can check
this).
Every image is drawn from its own random stream keyed on (seed, type, split, index): the same seed gives
byte-identical files, and choosing a subset of types does not change the images of the others.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

SYNTHETIC_CATEGORIES = ("weave", "granite", "washer", "bracket")
DEFECT_TYPES = ("scratch", "spot", "hole", "stain")
_KINDS = {"train": 0, "good": 1, "defect": 2}
_FORMAT_VERSION = 1

# What each product type looks like: a renderer plus its sensor noise (std in [0, 1] units).
_NOISE = {"weave": 0.015, "granite": 0.04, "washer": 0.01, "bracket": 0.025}


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1], (y, x), so shapes scale with the image size."""
    axis = (np.arange(size, dtype=np.float64) + 0.5) / size * 2.0 - 1.0
    return np.meshgrid(axis, axis, indexing="ij")


def _pose(y: np.ndarray, x: np.ndarray, dy: float, dx: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates in the frame of a part shifted by (dy, dx) and rotated by ``angle`` radians."""
    c, s = np.cos(angle), np.sin(angle)
    yy, xx = y - dy, x - dx
    return -s * xx + c * yy, c * xx + s * yy


def _coverage(signed_distance: np.ndarray, size: int) -> np.ndarray:
    """Antialiased inside-fraction from a signed distance (negative inside), in [-1, 1] units."""
    return np.clip(0.5 - signed_distance * size / 2.0, 0.0, 1.0)


def _box_sd(y: np.ndarray, x: np.ndarray, cy: float, cx: float, hy: float, hx: float) -> np.ndarray:
    qy, qx = np.abs(y - cy) - hy, np.abs(x - cx) - hx
    outside = np.hypot(np.maximum(qy, 0.0), np.maximum(qx, 0.0))
    return outside + np.minimum(np.maximum(qy, qx), 0.0)


def _value_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth random field in [0, 1]: a (cells+1)^2 random lattice, smoothstep-interpolated to size x size."""
    lattice = rng.random((cells + 1, cells + 1))
    t = (np.arange(size) + 0.5) / size * cells
    i = np.minimum(t.astype(int), cells - 1)
    f = t - i
    f = f * f * (3.0 - 2.0 * f)
    rows = lattice[i] * (1.0 - f)[:, None] + lattice[i + 1] * f[:, None]
    return rows[:, i] * (1.0 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _lighting(rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    gain = rng.uniform(0.92, 1.08)
    return gain * (1.0 + rng.uniform(-0.06, 0.06) * x + rng.uniform(-0.06, 0.06) * y)


# Each renderer returns (rgb (H, W, 3) in [0, 1] before noise, support (H, W) bool where defects may be
# centred, part (H, W) bool where defect pixels may land, hole colour (3,)).
Rendered = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _weave(rng: np.random.Generator, size: int) -> Rendered:
    y, x = _grid(size)
    v, u = _pose(y, x, rng.uniform(-1, 1), rng.uniform(-1, 1), np.deg2rad(rng.uniform(-4, 4)))
    threads = 6.0  # per unit length: 12 across the image
    fu, fv = u * threads, v * threads
    over = (np.floor(fu) + np.floor(fv)) % 2 == 0
    across = np.where(over, fu - np.floor(fu), fv - np.floor(fv))  # position across the visible thread
    shade = 0.55 + 0.45 * np.sin(np.pi * across)
    colour = np.array([0.80, 0.67, 0.45])
    rgb = shade[..., None] * colour * _lighting(rng, y, x)[..., None]
    everywhere = np.ones((size, size), dtype=bool)
    return rgb, everywhere, everywhere, np.array([0.05, 0.04, 0.03])


def _granite(rng: np.random.Generator, size: int) -> Rendered:
    y, x = _grid(size)
    field = sum(w * _value_noise(rng, size, c) for w, c in ((0.45, 4), (0.3, 8), (0.17, 16), (0.08, 32)))
    grey, pink = np.array([0.50, 0.49, 0.52]), np.array([0.74, 0.60, 0.57])
    rgb = grey + (pink - grey) * field[..., None]
    grains = rng.random((size, size))
    rgb = np.where((grains < 0.03)[..., None], rgb * 0.45, rgb)  # dark mica grains
    rgb = np.where((grains > 0.985)[..., None], np.minimum(rgb * 1.4, 1.0), rgb)  # bright quartz grains
    rgb = rgb * _lighting(rng, y, x)[..., None]
    everywhere = np.ones((size, size), dtype=bool)
    return rgb, everywhere, everywhere, np.array([0.04, 0.04, 0.05])


def _washer(rng: np.random.Generator, size: int) -> Rendered:
    y, x = _grid(size)
    cy, cx = rng.uniform(-0.05, 0.05, size=2)
    r = np.hypot(y - cy, x - cx)
    r_out, r_in = 0.62 + rng.uniform(-0.02, 0.02), 0.26 + rng.uniform(-0.01, 0.01)
    cover = _coverage(np.maximum(r - r_out, r_in - r), size)
    theta = np.arctan2(y - cy, x - cx)
    light = rng.uniform(-np.pi, np.pi)
    shade = 0.68 + 0.18 * np.cos(theta - light) + 0.04 * np.sin(70.0 * r)  # lit side + lathe rings
    metal = shade[..., None] * np.array([0.74, 0.77, 0.82])
    background = np.array([0.17, 0.19, 0.22]) * (1.0 + 0.1 * y)[..., None]
    rgb = (background + (metal - background) * cover[..., None]) * _lighting(rng, y, x)[..., None]
    margin = 0.06
    support = (r > r_in + margin) & (r < r_out - margin)
    return rgb, support, cover >= 0.5, np.array([0.17, 0.19, 0.22])


def _bracket(rng: np.random.Generator, size: int) -> Rendered:
    y, x = _grid(size)
    v, u = _pose(y, x, rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05), np.deg2rad(rng.uniform(-10, 10)))
    plate = np.minimum(_box_sd(v, u, 0.32, 0.0, 0.16, 0.55), _box_sd(v, u, -0.05, -0.39, 0.53, 0.16))
    holes = np.minimum(np.hypot(v - 0.32, u - 0.32), np.hypot(v + 0.4, u + 0.39)) - 0.07
    sd = np.maximum(plate, -holes)
    cover = _coverage(sd, size)
    copper = (0.85 + 0.12 * u)[..., None] * np.array([0.80, 0.47, 0.26])
    background = np.array([0.84, 0.84, 0.80])
    rgb = (background + (copper - background) * cover[..., None]) * _lighting(rng, y, x)[..., None]
    support = sd < -0.06
    return rgb, support, cover >= 0.5, background


_RENDERERS: dict[str, Callable[[np.random.Generator, int], Rendered]] = {
    "weave": _weave,
    "granite": _granite,
    "washer": _washer,
    "bracket": _bracket,
}


def _defect_overlay(
    rng: np.random.Generator,
    kind: str,
    size: int,
    base: np.ndarray,
    support: np.ndarray,
    part: np.ndarray,
    hole_colour: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(region bool, opacity, colour (H, W, 3)) of one defect of ``kind``, centred on a support pixel."""
    y, x = _grid(size)
    candidates = np.flatnonzero(support)
    centre = candidates[rng.integers(len(candidates))]
    cy, cx = y.flat[centre], x.flat[centre]
    pixel = 2.0 / size
    if kind == "scratch":
        angle, half = rng.uniform(0, np.pi), rng.uniform(0.12, 0.25)
        dy, dx = np.sin(angle), np.cos(angle)
        along = np.clip((y - cy) * dy + (x - cx) * dx, -half, half)
        distance = np.hypot(y - cy - along * dy, x - cx - along * dx)
        region = distance <= max(0.6 * pixel, 0.006)
        local = base[region].mean() if region.any() else 0.5
        colour = np.full(3, 0.95 if local < 0.5 else 0.08)
        opacity = 0.7
    elif kind == "spot":
        region = np.hypot(y - cy, x - cx) <= max(rng.uniform(0.03, 0.055), 1.5 * pixel)
        colour = np.array([0.16, 0.12, 0.10]) * rng.uniform(0.8, 1.2)
        opacity = 0.85
    elif kind == "hole":
        region = np.hypot(y - cy, x - cx) <= max(rng.uniform(0.05, 0.085), 2.0 * pixel)
        colour, opacity = hole_colour, 1.0
    elif kind == "stain":
        theta, radius = np.arctan2(y - cy, x - cx), np.hypot(y - cy, x - cx)
        r0 = rng.uniform(0.08, 0.14)
        k1, k2 = rng.integers(2, 5), rng.integers(5, 8)
        edge = r0 * (
            1 + 0.22 * np.sin(k1 * theta + rng.uniform(0, 7)) + 0.1 * np.sin(k2 * theta + rng.uniform(0, 7))
        )
        region = radius <= edge
        colour = np.array([0.45, 0.33, 0.12]) * rng.uniform(0.8, 1.1)
        opacity = rng.uniform(0.3, 0.45)
    else:
        raise ValueError(f"unknown defect type {kind!r}; known: {DEFECT_TYPES}")
    return region & part, np.float64(opacity), np.broadcast_to(colour, base.shape)


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
    return np.round(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)


def render_sample(
    category: str, kind: str, index: int, image_size: int = 128, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Render one image of the synthetic set, exactly as ``make_synthetic_dataset`` writes it.

    Args:
        category: one of ``SYNTHETIC_CATEGORIES``.
        kind: "train" (normal), "good" (normal test image) or "defect" (defective test image).
        index: the image's number within (category, kind); defect types cycle through ``DEFECT_TYPES``.
        image_size: side in pixels.
        seed: dataset seed.

    Returns:
        (normal, image, mask, defect_type): the (H, W, 3) uint8 normal render; the image itself (equal to
        ``normal`` unless kind is "defect"); the (H, W) bool mask of the pixels where ``image`` differs from
        ``normal``; "good" or the defect type.
    """
    if category not in _RENDERERS:
        raise ValueError(f"unknown synthetic category {category!r}; known: {SYNTHETIC_CATEGORIES}")
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {tuple(_KINDS)}, got {kind!r}")
    key = [seed, SYNTHETIC_CATEGORIES.index(category), _KINDS[kind], index]
    normal_rng = np.random.default_rng(key + [0])
    rgb, support, part, hole_colour = _RENDERERS[category](normal_rng, image_size)
    noise = _NOISE[category]
    normal_float = rgb + normal_rng.normal(0.0, noise, rgb.shape)
    normal = _to_uint8(normal_float)
    if kind != "defect":
        return normal, normal, np.zeros(normal.shape[:2], dtype=bool), "good"

    defect_type = DEFECT_TYPES[index % len(DEFECT_TYPES)]
    defect_rng = np.random.default_rng(key + [1])
    region, opacity, colour = _defect_overlay(
        defect_rng, defect_type, image_size, rgb, support, part, hole_colour
    )
    # The defect carries the same sensor noise as the part, so it cannot be found by its smoothness alone.
    paint = colour + defect_rng.normal(0.0, noise, rgb.shape)
    alpha = (region * opacity)[..., None]
    image = _to_uint8(normal_float * (1.0 - alpha) + paint * alpha)
    mask = (image != normal).any(axis=2)
    return normal, image, mask, defect_type


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, format="PNG")


def make_synthetic_dataset(
    root: str | os.PathLike,
    categories: Sequence[str] | None = None,
    n_train: int = 40,
    n_test_good: int = 10,
    n_test_defect: int = 12,
    image_size: int = 128,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write the synthetic set under ``root`` in the MVTec layout and return ``root``.

    Defaults (the ``omniad demo`` set): 4 types x (40 train + 10 good test + 12 defective test, 3 per defect
    type) at 128 px: 248 PNGs, ~9 MB, a few seconds. Files are ``<cat>/train/good/000.png``,
    ``<cat>/test/<type>/000.png`` and ``<cat>/ground_truth/<type>/000_mask.png`` (0/255),
    plus ``synthetic.json`` with the parameters.

    When ``root`` already holds a synthetic set made with the same parameters, nothing is written.

    Args:
        root: output folder (created).
        categories: subset of ``SYNTHETIC_CATEGORIES`` (default all).
        n_train: normal training images per type.
        n_test_good: normal test images per type.
        n_test_defect: defective test images per type; defect types cycle, so 4 or more covers all of them.
        image_size: side in pixels.
        seed: makes the set; the same seed writes byte-identical files.
        overwrite: replace the category folders of a different earlier set instead of raising.

    Raises:
        ValueError: unknown categories or bad counts.
        FileExistsError: ``root`` holds category folders from a different set and ``overwrite`` is False.
    """
    chosen = list(SYNTHETIC_CATEGORIES if categories is None else categories)
    unknown = [c for c in chosen if c not in SYNTHETIC_CATEGORIES]
    if unknown or not chosen:
        raise ValueError(f"unknown synthetic categories {unknown}; choose from {SYNTHETIC_CATEGORIES}")
    if n_train < 1 or n_test_good < 0 or n_test_defect < 0 or n_test_good + n_test_defect < 1:
        raise ValueError("need n_train >= 1 and at least one test image (n_test_good + n_test_defect >= 1)")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16, got {image_size}")

    root = Path(root)
    params = {
        "format_version": _FORMAT_VERSION,
        "categories": chosen,
        "n_train": n_train,
        "n_test_good": n_test_good,
        "n_test_defect": n_test_defect,
        "image_size": image_size,
        "seed": seed,
    }
    manifest = root / "synthetic.json"
    if manifest.is_file() and all((root / c).is_dir() for c in chosen):
        try:
            if json.loads(manifest.read_text()) == params:
                return root
        except (OSError, json.JSONDecodeError):
            pass
    existing = [root / c for c in chosen if (root / c).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{root} already holds {[p.name for p in existing]} from a different set; pass overwrite=True "
            "or choose an empty folder"
        )
    for folder in existing:
        shutil.rmtree(folder)
    manifest.unlink(missing_ok=True)  # written last: its presence means the set is complete

    for category in chosen:
        folder = root / category
        (folder / "train" / "good").mkdir(parents=True)
        (folder / "test" / "good").mkdir(parents=True)
        (folder / "ground_truth").mkdir()  # pixel ground truth exists even with no defective images
        for i in range(n_train):
            _save_png(
                render_sample(category, "train", i, image_size, seed)[1],
                folder / "train" / "good" / f"{i:03d}.png",
            )
        for i in range(n_test_good):
            _save_png(
                render_sample(category, "good", i, image_size, seed)[1],
                folder / "test" / "good" / f"{i:03d}.png",
            )
        numbers: dict[str, int] = {}
        for i in range(n_test_defect):
            _, image, mask, defect_type = render_sample(category, "defect", i, image_size, seed)
            number = numbers[defect_type] = numbers.get(defect_type, -1) + 1
            for sub in ("test", "ground_truth"):
                (folder / sub / defect_type).mkdir(parents=True, exist_ok=True)
            _save_png(image, folder / "test" / defect_type / f"{number:03d}.png")
            _save_png(
                mask.astype(np.uint8) * 255, folder / "ground_truth" / defect_type / f"{number:03d}_mask.png"
            )
    manifest.write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
    return root
