"""PyTorch Lightning: a callback that logs clipopt's statistics and refuses to clip twice.

Needs ``lightning`` (``pip install lightning``); imported only when this module is.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L

from ._common import find_clipper, log_values
from ._double import framework_clipping

__all__ = ["ClipoptCallback"]


class ClipoptCallback(L.Callback):
    """Log clipopt's statistics through Lightning's logger; warn about double clipping.

    At the first optimizer step it checks the Trainer's own clipping
    (``gradient_clip_val``) and warns, naming the setting to change, when a clipopt
    wrapper or attachment clips as well. Every ``every`` steps it logs the pre- and
    post-clip norm, threshold, coefficient, skipped flag, clip rate and skipped counts
    (two host reads, on logging steps only).

    Args:
        every: Log every so many training batches, >= 1.
        prefix: Prefix of the logged keys.

    Example:
        >>> from clipopt.integrations.lightning import ClipoptCallback
        >>> ClipoptCallback(every=50).every
        50
    """

    def __init__(self, every: int = 50, prefix: str = "clip/") -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        self.every = every
        self.prefix = prefix
        self.checked = False

    def on_before_optimizer_step(
        self, trainer: Any, pl_module: Any, optimizer: Any
    ) -> None:
        """At the first step: warn if Lightning clips too."""
        if self.checked:
            return
        self.checked = True
        if find_clipper(optimizer) is not None:
            for problem in framework_clipping(trainer):
                warnings.warn(problem, UserWarning, stacklevel=2)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Log the statistics every ``every`` batches."""
        if (batch_idx + 1) % self.every:
            return
        for optimizer in trainer.optimizers:
            clipper = find_clipper(optimizer)
            if clipper is not None:
                pl_module.log_dict(log_values(clipper, self.prefix))
                return
