"""Adding a new product type to a line without retraining: k normal images of it recalibrate the threshold
(``recalibrate``) and, for methods with normal references, extend them (``adapt``). What ``omniad calibrate`` and
``omniad adapt`` run.

A seen type's threshold does not transfer to an unseen type (its normal scores sit elsewhere), so a model moved to
a new type is recalibrated on normal images of that type. k images resolve false-alarm rates in steps of 1 / k: a
target between 0 and 1 / k cannot be set from them and is refused; ``target_far=0`` puts the threshold at the
highest of the k normal scores.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from omniad.calibration import Calibration


def read_normals(folder: str | os.PathLike, image_size: int) -> tuple[Tensor, list[Path]]:
    """Every image under ``folder`` (searched recursively, in name order), resized to ``image_size``.

    Returns:
        (K, 3, image_size, image_size) images in [0, 1] and their paths.

    Raises:
        FileNotFoundError: no such folder. ValueError: it holds no image files, or a file cannot be read (naming it).
    """
    from omniad.data.images import read_image
    from omniad.prediction import collect_inputs

    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder of normal images")
    files, skipped = collect_inputs(path)
    if skipped:  # said, not silent: a normal image saved with an odd extension would otherwise just be missing
        warnings.warn(f"{path}: {len(skipped)} entries are not used as normal images: " + "; ".join(
            f"{issue.path} ({issue.reason})" for issue in skipped[:5]) + (" ..." if len(skipped) > 5 else ""),
            stacklevel=2)
    images = []
    for file in files:
        try:
            images.append(read_image(file, image_size))
        except (OSError, ValueError) as err:
            raise ValueError(f"{file}: cannot be read as a normal image ({err})") from None
    return torch.stack(images), files


def check_far_resolvable(count: int, target_far: float) -> None:
    """Refuse a false-alarm rate that ``count`` normal images cannot resolve (0 < target < 1 / count)."""
    if count < 1:
        raise ValueError("recalibration needs at least one normal image of the new type; none were given")
    if not 0.0 <= target_far < 1.0:
        raise ValueError(f"target false-alarm rate must be in [0, 1), got {target_far}")
    if 0.0 < target_far < 1.0 / count:
        raise ValueError(
            f"{count} normal images cannot set a threshold at false-alarm rate {target_far:g}: they resolve rates "
            f"in steps of 1/{count} = {1 / count:.3g}. Give at least {int(-(-1 // target_far))} normal images, a "
            f"target of at least {1 / count:.3g}, or target 0 (the threshold at the highest of their scores)"
        )


def recalibrate(detector: Any, normals: Any, target_far: float | None = None, source: str | None = None) -> Calibration:
    """Set ``detector``'s threshold from normal images of the type it will inspect.

    Args:
        detector: a fitted detector.
        normals: (K, 3, H, W) images in [0, 1] (or anything ``detector.calibrate`` takes).
        target_far: the false-alarm rate to aim at on these images (default: the detector's current
            calibration's, else its ``target_far``).
        source: where the images came from, kept in the calibration.

    Returns:
        The new ``Calibration`` (also ``detector.calibration_``).
    """
    current = getattr(detector, "calibration_", None)
    far = target_far if target_far is not None else (current.target_far if current else detector.target_far)
    check_far_resolvable(len(normals), far)
    return detector.calibrate(normals, far, source or f"recalibrated on {len(normals)} normal images")


def adapt(detector: Any, normals: Tensor, target_far: float | None = None, source: str | None = None) -> Any:
    """Few-shot adaptation: ``detector.adapt_prototypes(normals)``; with ``target_far``, also the threshold from the
    same k images, each scored by the model adapted on the OTHER k - 1 (leave-one-out: an image among its own
    references scores about 0, and a threshold on such scores flags every other normal image: measured, see
    benchmarks/results/cross_class_new_type.md). Without ``target_far`` the adapted model has no threshold.

    Args:
        detector: a fitted detector whose method has normal references (pmad, patchcore).
        normals: (K, 3, H, W) normal images of the new type in [0, 1].
        target_far: the false-alarm rate for the new threshold (None: leave the model uncalibrated).
        source: where the images came from, kept in the calibration.

    Returns:
        The detector, adapted (and recalibrated).
    """
    count = len(normals)
    if count == 0:
        raise ValueError("adaptation needs at least one normal image of the new type; none were given")
    held_out = []
    if target_far is not None:
        check_far_resolvable(count, target_far)
        meta, tensors = detector.fitted_meta(), detector.state_tensors()
        for i in range(count):
            others = torch.cat([normals[:i], normals[i + 1 :]])
            if len(others):
                detector.adapt_prototypes(others)
            held_out.append(detector.score(normals[i : i + 1]).image_scores)
            detector.load_state(meta, tensors)  # back to the model before adaptation
    detector.adapt_prototypes(normals)
    if target_far is not None:
        text = source or f"{count} normal images, each scored by the model adapted on the others"
        detector.calibration_ = Calibration.from_normal_scores(torch.cat(held_out), target_far, text)
    return detector


__all__ = ["adapt", "check_far_resolvable", "read_normals", "recalibrate"]
