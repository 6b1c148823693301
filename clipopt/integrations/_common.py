"""What the framework callbacks share: finding clipopt's engine, and what to log."""

from __future__ import annotations

from typing import Any

from .._engine import Clipper
from .._optimizer import ClippedOptimizer
from .._ownership import owner
from .._stats import stat_values

__all__ = ["find_clipper", "log_values"]


def find_clipper(optimizer: Any) -> Clipper | None:
    """The engine that clips ``optimizer``, or None.

    A wrapper, an attachment, or either inside a framework's own optimizer wrapper
    (Lightning's, Accelerate's ``AcceleratedOptimizer``).
    """
    seen = 0
    while optimizer is not None and seen < 8:
        if isinstance(optimizer, ClippedOptimizer):
            return optimizer.clipper
        front = owner(optimizer) if hasattr(optimizer, "param_groups") else None
        if front is not None:
            return front.clipper  # type: ignore[no-any-return]
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return None


def log_values(clipper: Clipper, prefix: str) -> dict[str, float]:
    """The last step's statistics and the counts, as floats (two host reads)."""
    values = stat_values(clipper.last_stats, clipper.counts())
    return {f"{prefix}{k}": v for k, v in values.items()}
