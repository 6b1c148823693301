"""The clipping engine: everything that happens to the gradients before a step.

One :class:`Clipper` serves one optimizer, for both front-ends
(:class:`clipopt.ClippedOptimizer` and :func:`clipopt.attach`). At each step it

1. collects the parameters that have gradients (:mod:`clipopt._layout`), unscaling
   GradScaler's (or a user's) ``grad_scale`` first unless the strategy measures scaled
   gradients exactly (a single factor);
2. lets the strategy measure them, and applies the non-finite policy;
3. decides whether the step is skipped: on the host (one read of a 0-dim tensor), or,
   with a fused optimizer on an accelerator, in the kernel (``found_inf``, no read);
4. lets the strategy decide its factors and applies them (:mod:`clipopt._apply`), or
   hands a single factor to the fused kernel as ``grad_scale``;
5. counts, and publishes the step's :class:`clipopt.ClipStats` to its hooks.

It decides everything before it changes anything: a step that raises or is skipped on
the host leaves gradients, parameters and every state untouched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple, cast

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from . import _distributed as D
from . import functional as F
from ._apply import Applier, as_measurement, host_readable, unscale_
from ._counters import COUNTERS, Counters, Flag
from ._layout import Gradients
from ._protocol import ClipInputs, ClipResult, ClipStats, ClipStrategy, Measurement, Scale
from ._registry import build_strategy
from ._spikes import Parts, SpikeSkip, spike_of
from ._torch_private import fused_kernel, kernel_skip_is_safe, set_grad_mode

__all__ = ["STATE_KEY", "Clipper", "Handover", "NonfinitePolicy"]

NonfinitePolicy = Literal["skip", "error", "zero", "propagate"]
POLICIES: tuple[str, ...] = ("skip", "error", "zero", "propagate")

#: Top-level key of an optimizer's ``state_dict()`` that holds clipopt's own state.
STATE_KEY = "clipopt"
_STATE_VERSION = 2


class Handover(NamedTuple):
    """What a fused optimizer's kernel receives for the step (None: nothing)."""

    grad_scale: Tensor | None
    found_inf: Tensor | None


class Clipper:
    """The clipping step for one optimizer (see the module docs).

    Made by the front-ends; reach it as ``ClippedOptimizer.clipper`` or
    ``Attachment.clipper``.

    Args:
        optimizer: The optimizer whose gradients are clipped.
        strategy: A strategy object or a registered name.
        nonfinite: ``"skip"``, ``"error"``, ``"zero"`` or ``"propagate"``.
        process_group: The group over which plain-tensor gradients are shards, a 1-D
            ``DeviceMesh``, or None.
        strategy_kwargs: The strategy's parameters, when ``strategy`` is a name.

    Raises:
        TypeError, ValueError: As :class:`clipopt.ClippedOptimizer`.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        strategy: str | ClipStrategy | None = None,
        *,
        nonfinite: NonfinitePolicy = "skip",
        process_group: Any = None,
        skip_spikes: bool | SpikeSkip = False,
        strategy_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.strategy = build_strategy(strategy, strategy_kwargs or {})
        if not isinstance(skip_spikes, bool | SpikeSkip):
            raise TypeError(
                "skip_spikes must be True, False or a clipopt.SpikeSkip, "
                f"got {skip_spikes!r}"
            )
        #: The spike gate (:class:`clipopt.SpikeSkip`), or None.
        self.spikes = SpikeSkip() if skip_spikes is True else skip_spikes or None
        self._loss: Tensor | None = None
        if not isinstance(nonfinite, str) or nonfinite not in POLICIES:
            raise ValueError(
                f"nonfinite must be one of {', '.join(map(repr, POLICIES))}, "
                f"got {nonfinite!r}"
            )
        self.optimizer = optimizer
        self.nonfinite: NonfinitePolicy = nonfinite
        self._group = D.SharedGroup(D.as_group(process_group))
        self._applier = Applier()
        self._gradients = Gradients(self.strategy, self._group.value, self._applier)
        self._counters = Counters()
        self._fused = fused_kernel(optimizer)

    @property
    def process_group(self) -> Any:
        """The process group over which plain-tensor gradients are sharded, or None."""
        return self._group.value

    @property
    def fused(self) -> bool:
        """Whether the optimizer's kernel takes ``grad_scale`` and ``found_inf``."""
        return self._fused

    # -- the step ------------------------------------------------------------------------

    def clip(
        self, grad_scale: Tensor | None = None, found_inf: Tensor | None = None
    ) -> Handover | None:
        """Clip this step's gradients; return what the kernel gets, or None to skip.

        Args:
            grad_scale: The ``grad_scale`` set on the optimizer (GradScaler, or a user
                following torch's fused protocol): the gradients are scaled by it.
            found_inf: The ``found_inf`` set with it: nonzero skips the step.

        Returns:
            None when the step must be skipped (decided on the host); else the
            ``grad_scale`` and ``found_inf`` for the optimizer's kernel (both None for a
            plain optimizer).

        Raises:
            RuntimeError: Non-finite gradients under ``nonfinite="error"``.
        """
        # Under no_grad, set with torch's C switch: the context manager's objects cost
        # more than the whole clip of a small model's gradients in a training loop.
        if not torch.is_grad_enabled():
            return self._clip(grad_scale, found_inf)
        set_grad_mode(False)
        try:
            return self._clip(grad_scale, found_inf)
        finally:
            set_grad_mode(True)

    def _clip(self, grad_scale: Tensor | None, found_inf: Tensor | None) -> Handover | None:
        """:meth:`clip`, under no_grad.

        Written flat on purpose: in a training loop (caches cold after the backward
        pass) every Python function a step enters costs about a microsecond, as much as
        an op on a small tensor, so the host-known common case calls few of them.
        """
        fused = self._fused
        if not fused:  # a plain optimizer ignores them, and so does clipping
            grad_scale = found_inf = None
        strategy = self.strategy
        inputs = self._gradients.inputs(
            self.optimizer.param_groups,
            self._counters.calls,
            exact=strategy.exact_norms and not fused,
        )
        if inputs is None:
            self._gradients.warn_none()
            return Handover(grad_scale, found_inf)
        scale = None if grad_scale is None else grad_scale.reshape(())
        one_pass = scale is not None and strategy.single_factor
        if scale is not None and not one_pass:
            # The gradients are scaled; unscale them as the kernel would (a division),
            # so that the strategy sees true gradients, and hand it no grad_scale.
            unscale_(list(inputs.grads), scale)
        measured, nonfinite = self._measure(inputs, scale if one_pass else None)
        norm = measured.norm
        readable = nonfinite is False or nonfinite is True  # read: a real CPU tensor
        overflow = None
        if found_inf is not None:
            overflow = _known(found_inf.reshape(()) > 0)
        loss, self._loss = self._loss, None
        spike: Flag | None = None
        if self.spikes is not None:
            spike_flag, parts = spike_of(self.spikes, norm, loss)
            spike = _known(spike_flag)
        step = self._counters.calls
        skip: Tensor | None = None
        if fused and not readable and self._kernel_decides(inputs):
            terms = [nonfinite] if self.nonfinite == "skip" else []
            terms += [t for t in (overflow, spike) if t is not None]
            for term in terms:  # device flags on this path
                assert isinstance(term, Tensor)
                skip = term if skip is None else skip | term.to(skip.device)
            if self.spikes is not None:  # skipped for another reason: nothing recorded
                other = _any(terms[: len(terms) - 1], norm)
                self._record_spikes(parts, torch.logical_not(other))
        elif (nonfinite is not False or overflow is not None or spike is not None) and (
            self.nonfinite in ("skip", "error") or overflow is not None or spike is not None
        ):
            reason, nonfinite = self._host_decision(norm, nonfinite, overflow, spike)
            if self.spikes is not None and reason in (None, "spike"):
                self._record_spikes(parts, norm.new_ones((), dtype=torch.bool))
            if reason is not None:
                self._counters.skipped_on_host(step, norm, nonfinite, reason)
                return None
            overflow = False
        result = strategy.clip(inputs, measured, skip if strategy.honours_skip else None)
        flag = result.clipped
        clipped: Flag = flag
        if skip is None:  # known on the host where the norm was
            on_host = readable and type(flag) is Tensor and flag.device.type == "cpu"
            clipped = bool(flag) if on_host else _known(flag)
        unchanged = clipped is False and nonfinite is False
        handover = None
        if fused or not unchanged:
            handover = self._apply(
                inputs, result, norm, fused, scale if one_pass else None, unchanged
            )
        found = None if skip is None else skip.to(torch.float32)
        raw = (norm, result.threshold, result.coef, clipped, nonfinite, False)
        self._counters.stepped(step, raw, skip, overflow, spike)
        return Handover(handover, found)

    def _kernel_decides(self, inputs: ClipInputs) -> bool:
        """Whether a fused kernel skips the step (``found_inf``) instead of the host.

        Asked only for a fused optimizer whose statistic cannot be read for free (an
        accelerator: on the CPU the read is cheaper than the kernel's bookkeeping); then
        for strategies that leave their state alone on a skipped step, and once the
        optimizer's state survives a skipped kernel step.
        """
        return (
            self.nonfinite != "error"
            and self.strategy.honours_skip
            and kernel_skip_is_safe(self.optimizer, inputs.params, inputs.group_index)
        )

    def _record_spikes(self, parts: Parts, keep: Tensor) -> None:
        assert self.spikes is not None
        for name, value, outlier in parts:
            self.spikes.record(name, value, outlier, keep)

    def observe_loss(self, loss: Tensor | float) -> None:
        """Give the next step's loss to the spike gate (``skip_spikes``)."""
        if self.spikes is None:
            raise RuntimeError(
                "observe_loss() feeds the spike gate: pass skip_spikes=True (or a "
                "clipopt.SpikeSkip) to track losses"
            )
        self._loss = torch.as_tensor(loss).detach()

    def _host_decision(
        self, norm: Tensor, nonfinite: Flag, overflow: Flag | None, spike: Flag | None
    ) -> tuple[str | None, bool]:
        """Read the flags (once); return why the step is skipped (or None), and ``bad``.

        Raises:
            RuntimeError: Non-finite gradients under ``"error"`` (not an overflow that
                GradScaler handles).
        """
        if nonfinite is False and (overflow is None or overflow is False) and spike is None:
            return None, False  # all known on the host, nothing to read
        flags = [nonfinite, bool(overflow is not None and overflow), spike or False]
        if any(isinstance(f, Tensor) for f in flags):
            device = next(f.device for f in flags if isinstance(f, Tensor))
            read = torch.stack([torch.as_tensor(f, device=device) for f in flags])
            flags = [bool(v) for v in read.tolist()]
        bad, over, spiked = (bool(f) for f in flags)
        if over:
            return "overflow", bad  # GradScaler's business: it backs off, never an error
        if bad and self.nonfinite == "error":
            raise RuntimeError(
                f"non-finite gradients: the pre-clip statistic of {self.strategy!r} is "
                f"{float(norm)}; nothing was changed (nonfinite='error')"
            )
        if bad and self.nonfinite == "skip":
            return "nonfinite", bad
        if spiked:
            return "spike", bad
        return None, bad

    def _measure(
        self, inputs: ClipInputs, scale: Tensor | None
    ) -> tuple[Measurement, Flag]:
        """The strategy's measurement, and whether the raw gradients were non-finite.

        ``scale``: the gradients are still scaled by it (GradScaler's one pass), so the
        statistic is divided by it. Under ``"zero"`` the cleaned gradients' statistic
        needs a second measurement. On the CPU the flag is read for free and this
        happens only on a non-finite step; on an accelerator, without a host read, it
        happens every step.
        """
        measured = self.strategy.measure(inputs)
        if type(measured) is not Measurement or scale is not None:
            measured = _unscaled(as_measurement(measured), scale)
        norm = measured.norm
        if host_readable(norm):
            nonfinite: Flag = not math.isfinite(norm.item())
        else:
            nonfinite = torch.logical_not(torch.isfinite(norm))
        if self.nonfinite == "zero" and nonfinite is not False:
            F.nonfinite_to_zero_(inputs.grads)
            measured = _unscaled(as_measurement(self.strategy.measure(inputs)), scale)
        return measured, nonfinite

    def _apply(
        self,
        inputs: ClipInputs,
        result: ClipResult,
        norm: Tensor,
        fused: bool,
        scale: Tensor | None,
        unchanged: bool,
    ) -> Tensor | None:
        """Apply the factors, or return the ``grad_scale`` that makes the kernel do it.

        ``scale``: the gradients are still scaled by it (GradScaler's one pass).
        ``unchanged``: known on the host that the factors change nothing.
        """
        factors = result.factors
        if fused and len(factors) <= 1 and all(isinstance(f, Scale) for f in factors):
            if not factors or unchanged:
                # nothing to scale; without a grad_scale the kernel does not write the
                # gradients back either
                return scale
            coef = cast(Scale, factors[0]).factor
            inverse = (1.0 / coef).to(inputs.grads[0].device, torch.float32)
            return inverse if scale is None else inverse * scale.to(inverse)
        if not unchanged:
            self._applier(inputs, result, norm)
        return None

    # -- counts, statistics, state ---------------------------------------------------

    @property
    def last_stats(self) -> ClipStats | None:
        """The :class:`clipopt.ClipStats` of the last step that had gradients, or None."""
        return self._counters.last_stats

    @last_stats.setter
    def last_stats(self, value: ClipStats | None) -> None:
        self._counters.last_stats = value

    def count_skip(self, stats: ClipStats | None) -> None:
        """Count one step skipped for non-finite gradients, with its statistics.

        For a closure step undone from a snapshot (the snapshot restored the counts).
        """
        self._counters.restored_skip(stats)

    def add_stats_hook(self, hook: Callable[[ClipStats, int], None]) -> RemovableHandle:
        """Call ``hook(stats, step)`` after every step that had gradients.

        Skipped steps included; ``step`` counts the steps with gradients from 0, as
        ``ClipInputs.step`` does. Returns a handle whose ``remove()`` unregisters it.
        """
        return self._counters.add_hook(hook)

    def counts(self) -> dict[str, int]:
        """The running counts as plain ints (reads the device once).

        ``steps`` counts the steps that were applied, ``skipped_steps`` those skipped for
        non-finite gradients, ``spike_steps`` those skipped as spikes, ``clipped_steps``
        the applied steps where clipping changed the gradients and ``nonfinite_steps``
        those whose gradients were non-finite (skipped or not; a GradScaler overflow is
        the scaler's, and not counted). The clip rate is ``clipped_steps / steps``.
        """
        values = self._counters.values()
        applied = (
            values.pop("calls")
            - values["skipped_steps"]
            - values["spike_steps"]
            - values.pop("overflow_steps")
        )
        return {"steps": applied, **values}

    def state_dict(self) -> dict[str, Any]:
        """Clipopt's own state: the strategy's state and the counts (weights_only-safe)."""
        state = {
            "version": _STATE_VERSION,
            "strategy": self.strategy.state_dict(),
            **self._counters.state_dict(),
        }
        if self.spikes is not None:
            state["spikes"] = self.spikes.state_dict()
        return state

    def check_state_dict(self, state: Any) -> None:
        """Raise ``ValueError`` if ``state`` would not load; change and copy nothing."""
        if not isinstance(state, Mapping):
            raise ValueError(
                f"state_dict[{STATE_KEY!r}] must be a mapping, got {type(state).__name__}"
            )
        version = state.get("version")
        if version not in (1, _STATE_VERSION):
            raise ValueError(
                f"state_dict[{STATE_KEY!r}] has version {version!r}; this clipopt reads "
                f"versions 1 and {_STATE_VERSION}"
            )
        needed = ("strategy", "calls", *(COUNTERS[:3] if version == 1 else COUNTERS))
        missing = [k for k in needed if k not in state]
        if missing:
            raise ValueError(f"state_dict[{STATE_KEY!r}] lacks {', '.join(missing)}")
        self.strategy.check_state_dict(state["strategy"])
        if self.spikes is not None:
            self.spikes.check_state_dict(state.get("spikes", {}))

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s result (version 1 too); check it all first.

        Raises:
            ValueError: The state does not fit this engine's strategy.
        """
        self.check_state_dict(state)
        self.strategy.load_state_dict(state["strategy"])
        if self.spikes is not None:
            self.spikes.load_state_dict(state.get("spikes", {}))
        self._counters.load_state_dict(state)

    def reset(self) -> None:
        """Forget the strategy's state, the spike gate's and the counts."""
        self.strategy.reset()
        if self.spikes is not None:
            self.spikes.reset()
        self._counters.reset()


def _unscaled(measured: Measurement, scale: Tensor | None) -> Measurement:
    """The measurement of gradients still scaled by ``scale`` (None: unscaled)."""
    if scale is None:
        return measured
    norm = measured.norm
    return measured._replace(norm=norm / scale.to(norm.device, norm.dtype))


def _any(flags: list[Flag], like: Tensor) -> Tensor:
    """OR of device flags (False for none)."""
    out = torch.zeros_like(like, dtype=torch.bool)
    for flag in flags:
        out = out | torch.as_tensor(flag, device=like.device)
    return out


def _known(flag: Tensor) -> Flag:
    """A flag as a bool where reading it is free (a CPU tensor), else the tensor."""
    return bool(flag) if host_readable(flag) else flag
