"""Detect a framework's own gradient clipping, which would clip a second time."""

from __future__ import annotations

import warnings
from typing import Any

__all__ = ["check_double_clipping", "framework_clipping"]


def framework_clipping(trainer: Any) -> list[str]:
    """The clipping a training framework is configured to do, as messages naming the fix.

    Recognises a PyTorch Lightning ``Trainer`` (``gradient_clip_val``) and a Hugging Face
    ``Trainer`` or ``TrainingArguments`` (``max_grad_norm``), subclasses included.
    """
    problems = []
    clip_val = getattr(trainer, "gradient_clip_val", None)
    if clip_val:
        problems.append(
            f"Lightning's Trainer clips too (gradient_clip_val={clip_val}): set "
            "gradient_clip_val=None when clipopt clips"
        )
    args = getattr(trainer, "args", trainer)
    max_grad_norm = getattr(args, "max_grad_norm", None)
    if _is_training_arguments(args) and max_grad_norm and max_grad_norm > 0:
        problems.append(
            f"Hugging Face's Trainer clips too (max_grad_norm={max_grad_norm}): set "
            "max_grad_norm=0 in TrainingArguments when clipopt clips"
        )
    return problems


def _is_training_arguments(args: Any) -> bool:
    """A ``transformers.TrainingArguments``, or a subclass, without importing it."""
    return any(
        c.__name__ == "TrainingArguments" and c.__module__.startswith("transformers")
        for c in type(args).__mro__
    )


def check_double_clipping(trainer: Any) -> list[str]:
    """Warn when a training framework clips as well as clipopt, and say what to change.

    Recognises a PyTorch Lightning ``Trainer`` (``gradient_clip_val``) and a Hugging Face
    ``Trainer`` or ``TrainingArguments`` (``max_grad_norm``, subclasses included).
    Clipping twice makes the statistics misleading (the second clipper sees clipped
    gradients) and the threshold that matters unclear. The callbacks of
    :mod:`clipopt.integrations` run this check at the first step.

    Args:
        trainer: The framework's trainer (or training arguments).

    Returns:
        The problems found (empty when none); each is also warned.
    """
    problems = framework_clipping(trainer)
    for problem in problems:
        warnings.warn(problem, UserWarning, stacklevel=2)
    return problems
