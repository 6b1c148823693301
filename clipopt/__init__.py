"""clipopt: gradient clipping for PyTorch that is correct, fast and tunable.

Wrap the optimizer you already have; ``step()`` then clips first:

    >>> import torch, clipopt
    >>> model = torch.nn.Linear(3, 1)
    >>> sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> opt = clipopt.ClippedOptimizer(sgd, "norm", max_norm=1.0)
    >>> {"norm", "value"} <= set(clipopt.available_strategies())
    True
"""

from __future__ import annotations

import re as _re

import torch as _torch

#: The oldest torch release whose APIs clipopt uses (also pinned in pyproject.toml).
MIN_TORCH = (2, 6)


def _torch_version(version: str) -> tuple[int, int]:
    match = _re.match(r"(\d+)\.(\d+)", version)
    if match is None:  # pragma: no cover - torch always has a numeric version
        raise ImportError(f"clipopt cannot read the torch version {version!r}")
    return int(match.group(1)), int(match.group(2))


if _torch_version(_torch.__version__) < MIN_TORCH:  # pragma: no cover
    raise ImportError(
        f"clipopt needs torch>={MIN_TORCH[0]}.{MIN_TORCH[1]}, "
        f"found {_torch.__version__}; upgrade torch"
    )

from . import functional, strategies  # noqa: E402
from ._attach import Attachment, attach  # noqa: E402
from ._engine import Clipper, Handover, NonfinitePolicy  # noqa: E402
from ._health import GradRecorder, GradReport, GradReportRow, grad_report  # noqa: E402
from ._optimizer import ClippedOptimizer  # noqa: E402
from ._protocol import (  # noqa: E402
    Clamp,
    ClipInputs,
    ClipResult,
    ClipStats,
    ClipStrategy,
    Measurement,
    Scale,
    ScaleEach,
)
from ._registry import (  # noqa: E402
    available_strategies,
    get_strategy,
    register_strategy,
)
from ._spikes import SpikeSkip  # noqa: E402
from ._stats import StatsHistory, StatsLogger, log_stats  # noqa: E402
from .integrations import check_double_clipping  # noqa: E402
from .strategies import (  # noqa: E402
    AGC,
    AdaGC,
    Chain,
    NormClip,
    PercentileClip,
    RelativeClip,
    ValueClip,
    ZScoreClip,
)

__version__ = "0.2.0.dev0"

__all__ = [
    "AGC",
    "MIN_TORCH",
    "AdaGC",
    "Attachment",
    "Chain",
    "Clamp",
    "ClipInputs",
    "ClipResult",
    "ClipStats",
    "ClipStrategy",
    "ClippedOptimizer",
    "Clipper",
    "GradRecorder",
    "GradReport",
    "GradReportRow",
    "Handover",
    "Measurement",
    "NonfinitePolicy",
    "NormClip",
    "PercentileClip",
    "RelativeClip",
    "Scale",
    "ScaleEach",
    "SpikeSkip",
    "StatsHistory",
    "StatsLogger",
    "ValueClip",
    "ZScoreClip",
    "__version__",
    "attach",
    "available_strategies",
    "check_double_clipping",
    "functional",
    "get_strategy",
    "grad_report",
    "log_stats",
    "register_strategy",
    "strategies",
]
