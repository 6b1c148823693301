"""What the engine counts and publishes after each step with gradients.

Calls are counted on the host; the outcomes (skipped, clipped, non-finite, spike,
GradScaler overflow) in one small device tensor, so counting never reads the device.
Every step's :class:`clipopt.ClipStats` goes to ``last_stats`` and to the statistics
hooks, skipped steps included.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from ._protocol import ClipResult, ClipStats

__all__ = ["COUNTERS", "Counters"]

#: The device-side counters, in the order of the counts tensor.
COUNTERS = (
    "skipped_steps",
    "clipped_steps",
    "nonfinite_steps",
    "spike_steps",
    "overflow_steps",
)
Hook = Callable[[ClipStats, int], None]


class Counters:
    """The running counts, the last statistics, and the hooks that see every step."""

    def __init__(self) -> None:
        self.last_stats: ClipStats | None = None
        self.hooks: OrderedDict[int, Hook] = OrderedDict()
        self.reset()

    def reset(self) -> None:
        """Start counting from zero."""
        #: Steps with gradients so far (the next step's number).
        self.calls = 0
        self._counts: Tensor | None = None  # made on the first step's device
        self.last_stats = None

    def _add(self, flags: list[Tensor]) -> None:
        added = torch.stack([f.to(flags[0].device) for f in flags]).to(torch.int64)
        counts = self._counts
        self._counts = added if counts is None else counts + added.to(counts.device)

    def skipped_on_host(
        self, step: int, norm: Tensor, nonfinite: Tensor, reason: str
    ) -> None:
        """Count a step the host skipped (``reason``: nonfinite, spike or overflow)."""
        no = torch.zeros_like(nonfinite)
        yes = torch.ones_like(nonfinite)
        overflow = reason == "overflow"
        self._add(
            [
                yes if reason == "nonfinite" else no,
                no,
                no if overflow else nonfinite,
                yes if reason == "spike" else no,
                yes if overflow else no,
            ]
        )
        nan = torch.full_like(norm, math.nan)
        self._publish(
            step, ClipStats(norm, nan, torch.zeros_like(norm), no, nonfinite, yes)
        )

    def stepped(
        self,
        step: int,
        norm: Tensor,
        result: ClipResult,
        nonfinite: Tensor,
        skip: Tensor | None,
        overflow: Tensor | None,
    ) -> None:
        """Count a clipped step; ``skip``: the kernel skips where True (device flag)."""
        threshold, coef = result.threshold, result.coef
        clipped = result.clipped.to(nonfinite.device)
        no = torch.zeros_like(nonfinite)
        if skip is None:
            skipped = no
            flags = [no, clipped, nonfinite, no, no]
        else:
            threshold = torch.where(skip, torch.full_like(threshold, math.nan), threshold)
            coef = torch.where(skip, torch.zeros_like(coef), coef)
            clipped = clipped & torch.logical_not(skip)
            over = no if overflow is None else overflow
            own = skip & torch.logical_not(over)  # skipped by the policy, not the scaler
            counted_nonfinite = nonfinite & torch.logical_not(over)
            flags = [own & nonfinite, clipped, counted_nonfinite, no, over]
            skipped = skip
        self._add(flags)
        self._publish(step, ClipStats(norm, threshold, coef, clipped, nonfinite, skipped))

    def restored_skip(self, stats: ClipStats | None) -> None:
        """Count one step skipped for non-finite gradients after a snapshot restore."""
        self.calls += 1
        one = torch.ones((), dtype=torch.int64)
        zero = torch.zeros((), dtype=torch.int64)
        self._add([one, zero, one, zero, zero])
        self.last_stats = stats

    def _publish(self, step: int, stats: ClipStats) -> None:
        self.calls = step + 1
        self.last_stats = stats
        for hook in list(self.hooks.values()):
            hook(stats, step)

    def add_hook(self, hook: Hook) -> RemovableHandle:
        """Call ``hook(stats, step)`` after every step that had gradients."""
        handle = RemovableHandle(self.hooks)
        self.hooks[handle.id] = hook
        return handle

    def values(self) -> dict[str, int]:
        """Every counter as an int (one device read), and ``calls``."""
        if self._counts is None:
            counted = dict.fromkeys(COUNTERS, 0)
        else:
            counted = dict(zip(COUNTERS, map(int, self._counts.tolist()), strict=True))
        return {"calls": self.calls, **counted}

    def state_dict(self) -> dict[str, Any]:
        """``calls`` and the counters as 0-dim tensors (weights_only-safe)."""
        counts = self._counts
        if counts is None:
            counts = torch.zeros(len(COUNTERS), dtype=torch.int64)
        return {
            "calls": self.calls,
            **dict(zip(COUNTERS, counts.clone().unbind(), strict=True)),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s result (absent counters, from version 1: zero)."""
        self.calls = int(state["calls"])
        self._counts = torch.stack(
            [torch.as_tensor(state.get(k, 0)).to(torch.int64).reshape(()) for k in COUNTERS]
        )
        self.last_stats = None

    def __getstate__(self) -> dict[str, Any]:
        return {**vars(self), "hooks": OrderedDict()}  # hooks belong to their owners
