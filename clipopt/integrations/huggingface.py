"""Hugging Face ``Trainer``: a callback for clipopt's statistics and double clipping.

Needs ``transformers``; imported only when this module is.
"""

from __future__ import annotations

import warnings
from typing import Any

from transformers import TrainerCallback

from ._common import find_clipper, log_values
from ._double import framework_clipping

__all__ = ["ClipoptCallback", "install"]


class ClipoptCallback(TrainerCallback):
    """Add clipopt's statistics to the Trainer's logs; warn about double clipping.

    At the start of training it checks ``TrainingArguments.max_grad_norm`` (of any
    subclass of ``TrainingArguments``) and warns, naming the setting, when the
    optimizer is clipped by clipopt (a ``ClippedOptimizer`` or an ``attach``-ed one). At
    every log it adds the pre- and post-clip norm, threshold, coefficient, skipped flag,
    clip rate and skipped counts to the logs, for the callbacks after it (reporters such
    as TensorBoard or W&B): :func:`install` puts it before them.

    Args:
        prefix: Prefix of the logged keys.

    Example:
        >>> from clipopt.integrations.huggingface import ClipoptCallback
        >>> ClipoptCallback().prefix
        'clip/'
    """

    def __init__(self, prefix: str = "clip/") -> None:
        self.prefix = prefix
        self.optimizer: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Find the optimizer and warn if the Trainer clips too."""
        self.optimizer = kwargs.get("optimizer")
        if find_clipper(self.optimizer) is not None:
            for problem in framework_clipping(args):
                warnings.warn(problem, UserWarning, stacklevel=2)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any
    ) -> None:
        """Add the statistics to ``logs`` (two host reads, on logging steps only)."""
        clipper = find_clipper(kwargs.get("optimizer", self.optimizer))
        if clipper is not None and isinstance(logs, dict):
            logs.update(log_values(clipper, self.prefix))


def install(trainer: Any, prefix: str = "clip/") -> ClipoptCallback:
    """Put a :class:`ClipoptCallback` first in ``trainer``'s callbacks and return it.

    First, so that the reporters after it log clipopt's statistics too
    (``trainer.add_callback`` would append it after them).
    """
    callback = ClipoptCallback(prefix)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
