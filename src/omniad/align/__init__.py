"""Score alignment across product types: CADA's maths (from ``omniad.methods.cada``) and its class-aware
reference variants A and B, which need type labels and are therefore not registered detectors."""

from omniad.align.class_aware import ClassAwareA, ClassAwareB
from omniad.methods.cada import CADA, CADARegressor
from omniad.methods.cada.alignment import align_maps, class_statistics, image_statistics, map_moments
from omniad.methods.cada.base_reader import AlignmentData, collect_alignment_data

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
