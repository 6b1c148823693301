"""Clipping statistics over steps: a history for plots, and logging to any target.

Both listen to the engine (:meth:`clipopt.Clipper.add_stats_hook`), so they see every
step that had gradients, skipped ones included, numbered as the engine counts them.
Recording keeps device tensors (no host read) and copies them to the host in blocks,
so device memory stays bounded; the device is read only on logging steps, once per
block, or when asked.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ._attach import Attachment
from ._engine import Clipper
from ._optimizer import ClippedOptimizer
from ._protocol import ClipStats
from ._validation import check_int

__all__ = ["STAT_FIELDS", "StatsHistory", "StatsLogger", "clipper_of", "log_stats"]

#: The statistics of a step, in :class:`clipopt.ClipStats` order.
STAT_FIELDS = ClipStats._fields


def clipper_of(optimizer: Any, name: str = "optimizer") -> Clipper:
    """The engine of a :class:`clipopt.ClippedOptimizer` or a :class:`clipopt.Attachment`.

    Raises:
        TypeError: Anything else (the message names the fix).
    """
    if isinstance(optimizer, ClippedOptimizer | Attachment):
        return optimizer.clipper
    if isinstance(optimizer, Clipper):
        return optimizer
    raise TypeError(
        f"{name} must be a clipopt.ClippedOptimizer or a clipopt.Attachment (from "
        f"clipopt.attach), got {type(optimizer).__name__}; wrap the optimizer first"
    )


class StatsHistory:
    """Record the clipping statistics of every step, without reading the device.

    Every step with gradients is recorded, skipped ones too (their ``skipped`` flag set,
    ``nonfinite`` when that was the reason), with the engine's step number. Rows stay on
    the device until ``block`` of them are collected, then move to the host in one copy;
    with ``window``, only the last ``window`` steps are kept. Use it for plots
    (:func:`clipopt.plots.plot_stats`) or offline analysis; call :meth:`close` to stop.

    Args:
        optimizer: A :class:`clipopt.ClippedOptimizer` or :class:`clipopt.Attachment`.
        window: Keep only the last so many steps (None: all of them).
        block: Steps kept on the device before one copy to the host, >= 1.

    Example:
        >>> import torch, clipopt
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> sgd = torch.optim.SGD([p], lr=0.1)
        >>> opt = clipopt.ClippedOptimizer(sgd, "norm", max_norm=1.0)
        >>> history = clipopt.StatsHistory(opt)
        >>> for g in ([3.0, 4.0], [0.3, 0.4]):
        ...     p.grad = torch.tensor(g)
        ...     opt.step()
        >>> history.to_dict()["norm"] == [5.0, 0.5]
        True
        >>> history.steps
        [0, 1]
    """

    def __init__(
        self, optimizer: Any, *, window: int | None = None, block: int = 1000
    ) -> None:
        self.clipper = clipper_of(optimizer)
        self.window = None if window is None else check_int("window", window, minimum=1)
        self.block = check_int("block", block, minimum=1)
        self._pending: list[Tensor] = []
        self._pending_steps: list[int] = []
        self._rows: list[list[float]] = []
        self.steps: list[int] = []
        self._handle: Any = self.clipper.add_stats_hook(self._record)

    def _record(self, stats: ClipStats, step: int) -> None:
        self._pending.append(torch.stack([t.detach().to(torch.float64) for t in stats]))
        self._pending_steps.append(step)
        if len(self._pending) >= self.block:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            rows: list[list[float]] = torch.stack(self._pending).cpu().tolist()
            self._rows.extend(rows)
            self.steps.extend(self._pending_steps)
            self._pending, self._pending_steps = [], []
        if self.window is not None and len(self._rows) > self.window:
            del self._rows[: -self.window]
            del self.steps[: -self.window]

    def __len__(self) -> int:
        self._flush()
        return len(self._rows)

    def to_dict(self) -> dict[str, list[float]]:
        """Return every recorded statistic as a list of floats (one host copy)."""
        self._flush()
        return {name: [row[i] for row in self._rows] for i, name in enumerate(STAT_FIELDS)}

    def close(self) -> None:
        """Stop recording."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def stat_values(stats: ClipStats | None, counts: Mapping[str, int]) -> dict[str, float]:
    """The values every logger writes: the last step's statistics and the counts."""
    values: dict[str, float] = {}
    if stats is not None:
        d = stats.to_dict()
        values.update(
            norm=d["norm"],
            post_clip_norm=d["norm"] * d["coef"],
            threshold=d["threshold"],
            coef=d["coef"],
            clipped=d["clipped"],
            skipped=d["skipped"],
        )
    values["clip_rate"] = counts["clipped_steps"] / max(counts["steps"], 1)
    values["skipped_steps"] = float(counts["skipped_steps"])
    values["spike_steps"] = float(counts["spike_steps"])
    values["nonfinite_steps"] = float(counts["nonfinite_steps"])
    return values


class StatsLogger:
    """Log clipping statistics every ``every`` steps; made by :func:`log_stats`."""

    def __init__(
        self,
        optimizer: Any,
        target: Any,
        *,
        every: int,
        prefix: str,
        warn_after: int,
    ) -> None:
        self.clipper = clipper_of(optimizer)
        if not (callable(target) or hasattr(target, "add_scalar")):
            raise TypeError(
                "target must be a SummaryWriter (with add_scalar) or a callable "
                f"(stats, step), got {type(target).__name__}"
            )
        self.target = target
        self.every = check_int("every", every, minimum=1)
        self.warn_after = check_int("warn_after", warn_after, minimum=1)
        self.prefix = prefix
        self._warned: set[str] = set()
        self._last_counts: dict[str, int] | None = None
        self._streak: dict[str, int] = {"always": 0, "never": 0}
        self._handle: Any = self.clipper.add_stats_hook(self._on_step)

    def _on_step(self, stats: ClipStats, step: int) -> None:
        if (step + 1) % self.every == 0:
            self.log(step + 1)

    def log(self, step: int) -> dict[str, float]:
        """Read the statistics and counts (two host copies) and hand them to the target.

        Args:
            step: The step number to log under (the hook passes the count of steps
                with gradients so far, skipped ones included).
        """
        counts = self.clipper.counts()
        values = stat_values(self.clipper.last_stats, counts)
        self._check_rates(counts)
        if hasattr(self.target, "add_scalar"):
            for key, value in values.items():
                self.target.add_scalar(f"{self.prefix}{key}", value, step)
        else:
            self.target({f"{self.prefix}{k}": v for k, v in values.items()}, step)
        return values

    def _check_rates(self, counts: dict[str, int]) -> None:
        """Warn (once each) when clipping fired on every step, or never, for long."""
        last, self._last_counts = self._last_counts, counts
        if last is None:
            return
        steps = counts["steps"] - last["steps"]
        clipped = counts["clipped_steps"] - last["clipped_steps"]
        if steps <= 0:
            return
        self._streak["always"] = self._streak["always"] + steps if clipped == steps else 0
        self._streak["never"] = self._streak["never"] + steps if clipped == 0 else 0
        by_design = getattr(self.clipper.strategy, "clips_most_steps", False)
        if self._streak["always"] >= self.warn_after and not by_design:
            self._warn_once(
                "always",
                f"clipping fired on every one of the last {self._streak['always']} steps: "
                "the update is then the gradient's direction at a fixed length "
                "(normalised SGD); raise the threshold if that is not intended",
            )
        if self._streak["never"] >= self.warn_after:
            self._warn_once(
                "never",
                f"clipping has not fired in the last {self._streak['never']} steps: the "
                "threshold may be too high to catch spikes (see clipopt.tuning)",
            )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=6)

    def close(self) -> None:
        """Stop logging."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def log_stats(
    optimizer: Any,
    target: Any,
    *,
    every: int = 100,
    prefix: str = "clip/",
    warn_after: int = 1000,
) -> StatsLogger:
    """Log clipping statistics every ``every`` steps to TensorBoard or any callable.

    On logging steps only, the statistics are read from the device (one copy) and
    written: the pre- and post-clip norm, the threshold, the coefficient, whether the
    step clipped or was skipped, the clip rate so far and the skipped, spike and
    non-finite step counts. Steps are numbered by the engine (steps with gradients,
    skipped ones included, from 1), so logged numbers match the training loop's. The
    same checks warn, once each, when clipping fired on every step or on none for
    ``warn_after`` steps.

    Args:
        optimizer: A :class:`clipopt.ClippedOptimizer` or :class:`clipopt.Attachment`.
        target: A ``torch.utils.tensorboard.SummaryWriter`` (anything with
            ``add_scalar(tag, value, step)``), or a callable ``(stats, step)`` receiving a
            dict of floats (e.g. ``wandb.log`` with a lambda, or ``print``).
        every: Log every so many steps, >= 1.
        prefix: Prefix of the tags.
        warn_after: Steps of always (or never) clipping before a warning.

    Returns:
        The logger; ``close()`` stops it, ``log(step)`` logs at once.

    Example:
        >>> import torch, clipopt
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> sgd = torch.optim.SGD([p], lr=0.1)
        >>> opt = clipopt.ClippedOptimizer(sgd, "norm", max_norm=1.0)
        >>> logged = []
        >>> logger = clipopt.log_stats(opt, lambda stats, _: logged.append(stats), every=2)
        >>> for _ in range(4):
        ...     p.grad = torch.tensor([3.0, 4.0])
        ...     opt.step()
        >>> last = logged.pop()
        >>> len(logged) + 1, last["clip/norm"], last["clip/clip_rate"]
        (2, 5.0, 1.0)
    """
    return StatsLogger(optimizer, target, every=every, prefix=prefix, warn_after=warn_after)
