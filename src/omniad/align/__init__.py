"""Score alignment across product types: CADA (class-agnostic, a registered detector wrapping any base) and its
class-aware reference variants A and B (need type labels; not registered)."""

from omniad.align.cada import CADA
from omniad.align.core import AlignmentData, collect_alignment_data
from omniad.align.regressor import CADARegressor
from omniad.align.stats import align_maps, class_statistics, image_statistics, map_moments
from omniad.align.variants import ClassAwareA, ClassAwareB

__all__ = [
    "CADA",
    "AlignmentData",
    "CADARegressor",
    "ClassAwareA",
    "ClassAwareB",
    "align_maps",
    "class_statistics",
    "collect_alignment_data",
    "image_statistics",
    "map_moments",
]
