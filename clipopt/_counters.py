"""What the engine counts and publishes after each step with gradients.

A step's outcomes (skipped, clipped, non-finite, spike, GradScaler overflow) arrive as
*flags*: a Python bool where the engine knows them on the host (on the CPU a read is
free), else a 0-dim device tensor. Bools are counted on the host, tensors on the device,
so counting never reads the device and costs no op for what is already known. The
step's :class:`clipopt.ClipStats` are built when asked for (``last_stats``, or a hook
registered): a step nobody looks at makes no statistics tensors.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from ._protocol import ClipStats

__all__ = ["COUNTERS", "Counters", "Flag"]

#: The counters, in the order of the state dict.
COUNTERS = (
    "skipped_steps",
    "clipped_steps",
    "nonfinite_steps",
    "spike_steps",
    "overflow_steps",
)
Hook = Callable[[ClipStats, int], None]
#: Known on the host (bool) or not (a 0-dim bool tensor on the device).
Flag = bool | Tensor
#: A step's statistics before they are tensors: (norm, threshold, coef, clipped,
#: nonfinite, skipped).
Raw = tuple[Tensor, Tensor | float, Tensor | float, Flag, Flag, Flag]


def _tensor(value: Tensor | float | bool, like: Tensor) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, bool):
        return torch.full_like(like, value, dtype=torch.bool)
    return torch.full_like(like, value)


def stats_of(raw: Raw) -> ClipStats:
    """The statistics as 0-dim tensors on the norm's device (fills, no host copy)."""
    norm = raw[0]
    return ClipStats(norm, *(_tensor(v, norm) for v in raw[1:]))


class Counters:
    """The running counts, the last statistics, and the hooks that see every step."""

    def __init__(self) -> None:
        self.hooks: OrderedDict[int, Hook] = OrderedDict()
        self.reset()

    def reset(self) -> None:
        """Start counting from zero."""
        #: Steps with gradients so far (the next step's number).
        self.calls = 0
        self._host = dict.fromkeys(COUNTERS, 0)
        self._device: dict[str, Tensor] = {}
        self._raw: Raw | None = None
        self._stats: ClipStats | None = None

    @property
    def last_stats(self) -> ClipStats | None:
        """The last step's statistics (built on first access)."""
        if self._stats is None and self._raw is not None:
            self._stats = stats_of(self._raw)
        return self._stats

    @last_stats.setter
    def last_stats(self, value: ClipStats | None) -> None:
        self._raw, self._stats = None, value

    def _add(self, name: str, flag: Flag) -> None:
        if isinstance(flag, bool):
            self._host[name] += flag
            return
        kept = self._device.get(name)
        flag = flag.to(torch.int64)
        # (a counter loaded from a checkpoint moves to the flags' device once)
        self._device[name] = flag if kept is None else kept.to(flag.device) + flag

    def skipped_on_host(
        self, step: int, norm: Tensor, nonfinite: bool, reason: str
    ) -> None:
        """Count a step the host skipped (``reason``: nonfinite, spike or overflow)."""
        self._host["skipped_steps"] += reason == "nonfinite"
        self._host["nonfinite_steps"] += nonfinite and reason != "overflow"
        self._host["spike_steps"] += reason == "spike"
        self._host["overflow_steps"] += reason == "overflow"
        self._publish(step, (norm, math.nan, 0.0, False, nonfinite, True))

    def stepped(
        self,
        step: int,
        raw: Raw,
        skip: Tensor | None,
        overflow: Flag | None,
        spike: Flag | None = None,
    ) -> None:
        """Count a step whose factors were applied (``skip``: the kernel may skip it).

        ``raw`` holds the strategy's statistics; where ``skip`` is True (a device flag)
        they become those of a skipped step: for non-finite gradients, a GradScaler
        overflow, or a ``spike`` (in that order of precedence).
        """
        norm, threshold, coef, clipped, nonfinite, _ = raw
        if skip is None:
            if type(clipped) is bool and type(nonfinite) is bool:  # the host's step
                self._host["clipped_steps"] += clipped
                self._host["nonfinite_steps"] += nonfinite
            else:
                self._add("clipped_steps", clipped)
                self._add("nonfinite_steps", nonfinite)
            self._publish(step, (norm, threshold, coef, clipped, nonfinite, False))
            return
        kept = torch.logical_not(skip)
        over = _tensor(False if overflow is None else overflow, norm)
        bad = _tensor(nonfinite, norm)
        clipped = _tensor(clipped, norm) & kept
        fine = torch.logical_not(over) & torch.logical_not(bad)
        self._add("skipped_steps", skip & torch.logical_not(over) & bad)
        self._add("clipped_steps", clipped)
        self._add("nonfinite_steps", bad & torch.logical_not(over))
        self._add("overflow_steps", over)
        if spike is not None:
            self._add("spike_steps", skip & fine & _tensor(spike, norm))
        threshold = torch.where(skip, math.nan, _tensor(threshold, norm))
        coef = torch.where(skip, 0.0, _tensor(coef, norm))
        self._publish(step, (norm, threshold, coef, clipped, bad, skip))

    def restored_skip(self, stats: ClipStats | None) -> None:
        """Count one step skipped for non-finite gradients after a snapshot restore."""
        self.calls += 1
        self._host["skipped_steps"] += 1
        self._host["nonfinite_steps"] += 1
        self.last_stats = stats

    def _publish(self, step: int, raw: Raw) -> None:
        self.calls = step + 1
        self._raw, self._stats = raw, None
        if self.hooks:
            stats = self.last_stats
            assert stats is not None
            for hook in list(self.hooks.values()):
                hook(stats, step)

    def add_hook(self, hook: Hook) -> RemovableHandle:
        """Call ``hook(stats, step)`` after every step that had gradients."""
        handle = RemovableHandle(self.hooks)
        self.hooks[handle.id] = hook
        return handle

    def values(self) -> dict[str, int]:
        """Every counter as an int (one device read, if any is on the device), and calls."""
        out = dict(self._host)
        if self._device:
            names = list(self._device)
            read = torch.stack([self._device[n].cpu() for n in names]).tolist()
            for name, value in zip(names, read, strict=True):
                out[name] += int(value)
        return {"calls": self.calls, **out}

    def state_dict(self) -> dict[str, Any]:
        """``calls`` and the counters as 0-dim int64 tensors (weights_only-safe)."""
        state: dict[str, Any] = {"calls": self.calls}
        for name in COUNTERS:
            device = self._device.get(name)
            host = torch.tensor(self._host[name], dtype=torch.int64)
            state[name] = host if device is None else (device + self._host[name]).clone()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s result (absent counters, from version 1: zero)."""
        self.calls = int(state["calls"])
        self._host = dict.fromkeys(COUNTERS, 0)
        self._device = {
            k: torch.as_tensor(state.get(k, 0)).to(torch.int64).reshape(()).clone()
            for k in COUNTERS
        }
        self._raw, self._stats = None, None

    def __getstate__(self) -> dict[str, Any]:
        return {**vars(self), "hooks": OrderedDict()}  # hooks belong to their owners
