"""The built-in clipping strategies, one module each, and helpers to write your own.

Every strategy measures the gradients and returns factors (a :class:`clipopt.Scale`,
per-tensor :class:`clipopt.ScaleEach`, or an element-wise :class:`clipopt.Clamp`); the
engine applies them. See ``docs/custom.md`` to write one.
"""

from __future__ import annotations

from .._apply import apply_factors, clip_gradients
from ._common import (
    PerTensorNorms,
    TensorState,
    group_threshold,
    per_tensor_norms,
    recordable,
    total_norm_of,
)
from .adagc import AdaGC
from .agc import AGC
from .chain import Chain
from .norm import NormClip
from .percentile import PercentileClip
from .relative import RelativeClip
from .value import ValueClip
from .zscore import ZScoreClip

__all__ = [
    "AGC",
    "AdaGC",
    "Chain",
    "NormClip",
    "PerTensorNorms",
    "PercentileClip",
    "RelativeClip",
    "TensorState",
    "ValueClip",
    "ZScoreClip",
    "apply_factors",
    "clip_gradients",
    "group_threshold",
    "per_tensor_norms",
    "recordable",
    "total_norm_of",
]
