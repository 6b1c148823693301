"""One clipper per optimizer: a second wrapper or attachment is a mistake, reported.

Two clippers on one optimizer would clip twice (the second sees clipped gradients, and
its statistics mislead). The optimizer records, by a weak reference, which front-end
clips it; a second front-end raises a ``TypeError`` naming the fix.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["borrowed", "claim", "owner", "release"]

_MARK = "_clipopt_owner"


def owner(optimizer: torch.optim.Optimizer) -> Any:
    """The live wrapper or attachment that clips ``optimizer``, or None."""
    ref = vars(optimizer).get(_MARK)
    return None if ref is None else ref()


def claim(optimizer: torch.optim.Optimizer, front: Any, kind: str) -> None:
    """Record that ``front`` (a ``kind``) clips ``optimizer``.

    Raises:
        TypeError: Another live wrapper or attachment clips it already.
    """
    current = owner(optimizer)
    if current is not None and current is not front:
        what = type(current).__name__
        fix = (
            "call .detach() on the attachment first"
            if what == "Attachment"
            else "use that ClippedOptimizer (or its .optimizer with no clipping)"
        )
        raise TypeError(
            f"this {type(optimizer).__name__} is already clipped by a {what}; a second "
            f"{kind} would clip its gradients twice: {fix}, and combine strategies with "
            "clipopt.Chain"
        )
    vars(optimizer)[_MARK] = weakref.ref(front)


def release(optimizer: torch.optim.Optimizer) -> None:
    """Forget who clips ``optimizer``."""
    vars(optimizer).pop(_MARK, None)


@contextlib.contextmanager
def borrowed(optimizer: torch.optim.Optimizer) -> Iterator[torch.optim.Optimizer]:
    """Lend a clipped optimizer to a temporary front-end (a probe that records norms).

    Within the block another front-end may claim it; afterwards the owner is back.
    """
    previous = vars(optimizer).pop(_MARK, None)
    try:
        yield optimizer
    finally:
        if previous is None:
            vars(optimizer).pop(_MARK, None)
        else:
            vars(optimizer)[_MARK] = previous
