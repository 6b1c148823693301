"""Applying a strategy's factors to the gradients: the one place gradients change.

The engine applies every :class:`~clipopt.ClipResult` here (or hands a single
:class:`~clipopt.Scale` to a fused optimizer's kernel instead, see ``_engine``). On the
CPU, where reading a value costs no device sync, it skips what would change nothing: a
result that clipped nothing with a finite statistic, and per-tensor factors of exactly 1.
On any other device every pass runs, so no host read happens.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _distributed as D
from . import functional as F
from ._protocol import (
    Clamp,
    ClipInputs,
    ClipResult,
    ClipStrategy,
    Measurement,
    Scale,
    ScaleEach,
)
from ._torch_private import group_by_device_and_dtype

__all__ = [
    "Applier",
    "apply_factors",
    "as_measurement",
    "clip_gradients",
    "host_readable",
    "unscale_",
]


def host_readable(tensor: Tensor) -> bool:
    """Whether reading ``tensor`` on the host is free: a real CPU tensor, not compiling.

    Always False for other devices, fake or meta tensors, and under ``torch.compile``.
    """
    return (
        type(tensor) is Tensor
        and tensor.device.type == "cpu"
        and not torch.compiler.is_compiling()
    )


def as_measurement(measured: Measurement | Tensor) -> Measurement:
    """A strategy's :meth:`~clipopt.ClipStrategy.measure` result as a Measurement."""
    return measured if isinstance(measured, Measurement) else Measurement(measured)


def _at(items: Sequence[Tensor], at: Sequence[int] | None) -> list[Tensor]:
    if at is None or len(at) == len(items):
        return list(items)
    return [items[i] for i in at]


class Applier:
    """Applies factors; keeps 0-dim views of a buffer between steps.

    Per-tensor factors come as a 1-D tensor; the foreach kernels want one 0-dim tensor
    per gradient (Python floats run twice as slowly in the CPU loop), and ``unbind`` of
    2,000 factors costs about 1.7 ms on this project's CPU. So the factors are copied
    into a kept buffer whose views are made once.
    """

    def __init__(self) -> None:
        self._kept: tuple[Tensor, tuple[Tensor, ...]] | None = None

    def __getstate__(self) -> dict[str, object]:
        return {"_kept": None}  # scratch: copies start without it

    def views(self, factors: Tensor) -> tuple[Tensor, ...]:
        """0-dim views holding ``factors`` (a 1-D tensor)."""
        kept = self._kept
        if (
            kept is None
            or kept[0].shape != factors.shape
            or kept[0].dtype != factors.dtype
            or kept[0].device != factors.device
            or torch.compiler.is_compiling()
        ):
            buffer = torch.empty_like(factors)
            kept = self._kept = (buffer, buffer.unbind())
        # (the foreach copy also runs on the fake CUDA tensors of the sync-free tests,
        # where Tensor.copy_ hits a device guard of a CPU-only build)
        torch._foreach_copy_([kept[0]], [factors])
        return kept[1]

    def __call__(self, inputs: ClipInputs, result: ClipResult, norm: Tensor) -> None:
        """Apply ``result.factors`` to ``inputs.grads``, in order.

        ``norm`` is the statistic the result was decided from: with a finite one, a
        result that clipped nothing changes nothing, which the CPU reads for free.
        """
        if not result.factors:
            return
        readable = host_readable(result.clipped)
        finite = readable and math.isfinite(float(norm))
        if finite and not bool(result.clipped):
            return
        grads = inputs.grads
        for factor in result.factors:
            if isinstance(factor, Scale):
                F.scale_(grads, factor.factor, uniform=inputs.uniform)
            elif isinstance(factor, Clamp):
                if not math.isinf(factor.limit):
                    F.clamp_(_at(grads, factor.at), factor.limit, uniform=inputs.uniform)
            elif isinstance(factor, ScaleEach):
                self._scale_each(inputs, factor, finite)
            else:
                raise TypeError(
                    "a ClipResult's factors must be Scale, ScaleEach or Clamp, got "
                    f"{type(factor).__name__}"
                )

    def _scale_each(self, inputs: ClipInputs, factor: ScaleEach, finite: bool) -> None:
        grads = _at(inputs.grads, factor.at)
        coefs = factor.factors
        if isinstance(coefs, Tensor):
            if finite and host_readable(coefs):
                # On the CPU, reading which tensors clip is free: scale only those.
                chosen = (coefs < 1).nonzero().flatten().tolist()
                if not chosen:
                    return
                views = self.views(coefs)
                grads = [grads[i] for i in chosen]
                coefs = [views[i] for i in chosen]
            else:
                coefs = self.views(coefs)
        F.scale_each_(grads, coefs, uniform=inputs.uniform)


def apply_factors(inputs: ClipInputs, result: ClipResult, norm: Tensor) -> None:
    """Apply a result's factors now, with the engine's applier when there is one.

    For strategies that compose others (:class:`clipopt.Chain`): a member's factors must
    be applied before the next member measures.
    """
    applier = inputs.apply if inputs.apply is not None else Applier()
    applier(inputs, result, norm)


def clip_gradients(
    strategy: ClipStrategy, inputs: ClipInputs
) -> tuple[Measurement, ClipResult]:
    """Measure, clip and apply in one call, outside an optimizer.

    No non-finite policy and no fused kernel: what the engine does at an ordinary step.
    The strategy's plan is made for these inputs if they carry none.

    Example:
        >>> import torch, clipopt
        >>> from clipopt.strategies import clip_gradients
        >>> g = [torch.tensor([3.0, 4.0])]
        >>> measured, result = clip_gradients(
        ...     clipopt.NormClip(1.0), clipopt.ClipInputs(g, g, step=0))
        >>> measured.norm, g[0]
        (tensor(5.), tensor([0.6000, 0.8000]))
    """
    if inputs.plan is None:
        plan = strategy.plan(inputs)
        if plan is not None:
            inputs = dataclasses.replace(inputs, plan=plan)
    measured = as_measurement(strategy.measure(inputs))
    result = strategy.clip(inputs, measured)
    apply_factors(inputs, result, measured.norm)
    return measured, result


def unscale_(grads: list[Tensor], scale: Tensor) -> None:
    """Divide the gradients by ``scale`` in place, as a fused kernel's ``grad_scale``."""
    for device, members, _ in group_by_device_and_dtype(D.locals_of(grads)):
        torch._foreach_div_(members, scale.to(device))
