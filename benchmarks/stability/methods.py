"""The methods the benchmark compares: how one training step clips and steps.

A :class:`Method` turns a task run's model and optimizer into a :class:`Stepper`, whose
``step(loss)`` is called after ``loss.backward()`` and does the clipping and the
optimizer step. The kinds:

* ``none`` - no clipping.
* ``torch`` - ``torch.nn.utils.clip_grad_norm_(params, max_norm)`` then ``step()``: the
  reference, over a log grid of ``max_norm`` (:func:`torch_grid`).
* ``clipopt`` - ``clipopt.ClippedOptimizer(opt, name, **kwargs)``: the built-in
  strategies with their published defaults, through the public API only. With
  ``strategy=None`` it is ``clipopt.ClippedOptimizer(opt)``, whatever the default is
  once clipopt has one (:data:`CLIPOPT_DEFAULT`, not in the method list until then).
* ``candidate`` - a standalone rule of ``candidates.py`` (``rule.clip_()`` then
  ``step()``).
* ``gate(...)`` - any of the above behind the spike-skip gate
  (``candidates.SpikeSkip``): the pre-clip total norm (and the loss) are tested first,
  and a skipped step calls nothing (no clipping, no optimizer step, so no state moves).
  The gate's decision is a tensor; this harness reads it on the host.

To add a method, append to :func:`all_methods` (or build one with the helpers below);
names must be unique, they key the results.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

import clipopt

from . import candidates as C
from .tasks import TaskRun

__all__ = [
    "BUILTINS",
    "CLIPOPT_DEFAULT",
    "CLIPOPT_SHIPPED",
    "Method",
    "Stepper",
    "all_methods",
    "torch_grid",
]


class Stepper:
    """Clips and steps; counts what it did."""

    def __init__(self, fn: Callable[[Tensor], None]) -> None:
        self._fn = fn
        self.skipped = 0

    def step(self, loss: Tensor) -> None:
        self._fn(loss)


@dataclass(frozen=True)
class Method:
    """A named way to clip and step."""

    name: str
    kind: str  # none, torch, clipopt, candidate, gate
    make: Callable[[TaskRun], Stepper] = field(compare=False, repr=False)
    max_norm: float | None = None  # the grid value, for kind "torch"
    note: str = ""

    def prepare(self, run: TaskRun) -> Stepper:
        return self.make(run)


def _params(run: TaskRun) -> list[Tensor]:
    return [p for p in run.model.parameters() if p.requires_grad]


def no_clip() -> Method:
    def make(run: TaskRun) -> Stepper:
        return Stepper(lambda loss: run.optimizer.step())

    return Method("no clipping", "none", make)


def torch_norm(max_norm: float) -> Method:
    def make(run: TaskRun) -> Stepper:
        params = _params(run)

        def step(loss: Tensor) -> None:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            run.optimizer.step()

        return Stepper(step)

    return Method(f"torch max_norm={max_norm:g}", "torch", make, max_norm=max_norm)


def torch_grid(
    lo_exp: float = -4.0, hi_exp: float = 4.0, per_decade: int = 2
) -> list[float]:
    """``10**lo_exp .. 10**hi_exp``, ``per_decade`` values a decade (1, 3.16, 10 ...)."""
    n = round((hi_exp - lo_exp) * per_decade)
    return [float(f"{10 ** (lo_exp + i / per_decade):.3g}") for i in range(n + 1)]


def builtin(label: str, strategy: str | None, **kwargs: Any) -> Method:
    """``clipopt.ClippedOptimizer(opt, strategy, **kwargs)``; no strategy: the default."""

    def make(run: TaskRun) -> Stepper:
        if strategy is None:
            wrapped = clipopt.ClippedOptimizer(run.optimizer)
        else:
            wrapped = clipopt.ClippedOptimizer(run.optimizer, strategy, **kwargs)
        return Stepper(lambda loss: wrapped.step())

    return Method(label, "clipopt", make)


#: Every built-in with its published defaults (``value`` with clip_value=1.0).
BUILTINS: list[Method] = [
    builtin("norm (max_norm=1.0)", "norm"),
    builtin("value (clip_value=1.0)", "value", clip_value=1.0),
    builtin("percentile (AutoClip p10)", "percentile"),
    builtin("zscore (ZClip)", "zscore"),
    builtin("adagc (AdaGC)", "adagc"),
    builtin("agc (AGC 0.01)", "agc"),
]

#: ``clipopt.ClippedOptimizer(opt)`` with no strategy: the shipped default
#: (``clipopt.RelativeClip``, the "recommended default" candidate ported).
CLIPOPT_DEFAULT = builtin("clipopt default", None)


def skipping(label: str, strategy: str | None, **kwargs: Any) -> Method:
    """``ClippedOptimizer(opt, strategy, skip_spikes=True)``, stepped with the loss.

    clipopt's own spike skipping (``clipopt.SpikeSkip``, OLMo-core's rule on the norm
    and the loss); the harness counts the skipped spikes from ``counts()``.
    """

    def make(run: TaskRun) -> Stepper:
        args = () if strategy is None else (strategy,)
        wrapped = clipopt.ClippedOptimizer(run.optimizer, *args, skip_spikes=True, **kwargs)
        stepper: Stepper

        def step(loss: Tensor) -> None:
            wrapped.step(loss=loss)
            stepper.skipped = wrapped.counts()["spike_steps"]

        stepper = Stepper(step)
        return stepper

    return Method(label, "clipopt", make)


#: What clipopt ships: the default, and spike skipping with and without it.
CLIPOPT_SHIPPED: list[Method] = [
    CLIPOPT_DEFAULT,
    skipping("clipopt default + skip_spikes", None),
    skipping("clipopt skip_spikes only", "norm", max_norm=math.inf),
]


def candidate(label: str, factory: Callable[[list[Tensor]], Any], note: str = "") -> Method:
    """A standalone rule from ``candidates.py``: ``rule.clip_()`` then ``step()``."""

    def make(run: TaskRun) -> Stepper:
        rule = factory(_params(run))

        def step(loss: Tensor) -> None:
            rule.clip_()
            run.optimizer.step()

        return Stepper(step)

    return Method(label, "candidate", make, note=note)


def gated(inner: Method, label: str | None = None, **gate_kwargs: Any) -> Method:
    """``inner`` behind the spike-skip gate (OLMo-core's rule, ``candidates.SpikeSkip``)."""

    def make(run: TaskRun) -> Stepper:
        params = _params(run)
        gate = C.SpikeSkip(**gate_kwargs)
        inner_stepper = inner.prepare(run)
        stepper: Stepper

        def step(loss: Tensor) -> None:
            norm = torch.nn.utils.get_total_norm(
                [p.grad for p in params if p.grad is not None]
            )
            go = gate.update(norm, loss)
            if bool(go):  # the harness reads the decision; the rule itself does not
                inner_stepper.step(loss)
            else:
                stepper.skipped += 1

        stepper = Stepper(step)
        return stepper

    name = label or f"gate + {inner.name}"
    return Method(name, "gate", make, max_norm=inner.max_norm)


# -- the candidates tried for the default ------------------------------------------------


def _rel(**kw: Any) -> Callable[[list[Tensor]], Any]:
    return lambda params: C.RelativeClip(params, **kw)


def candidate_methods() -> list[Method]:
    """The candidate rules kept in the full run (README, "Candidates" has the sweep)."""
    rec = dict(C.RECOMMENDED)
    return [
        candidate("recommended default", C.recommended),
        candidate("rec. without ramp", _rel(**{**rec, "ramp": 0})),
        candidate("rec. per tensor", _rel(**{**rec, "scope": "tensor"})),
        candidate("rec. with c=0.5", _rel(**{**rec, "c": 0.5})),
        candidate(
            "light: tensor c=1, K=2, ramp",
            _rel(c=1.0, cap=2.0, beta_up=0.99, beta_down=0.9, ramp=20),
        ),
        candidate("naive: tensor EMA c=2", _rel(c=2.0, beta_up=0.99)),
        candidate(
            "AdaGC-relative: tensor c=1.04, min 20, ramp",
            _rel(c=1.04, beta_up=0.99, min_steps=20, ramp=20),
        ),
    ]


def gate_methods(default: Method) -> list[Method]:
    """The spike-skip gate on its own, and in front of the default candidate."""
    return [
        gated(no_clip(), "gate (norm) + no clipping"),
        gated(default, "gate (norm) + default"),
        gated(default, "gate (norm+loss) + default", use_loss=True),
        gated(
            default, "gate (OLMo window) + default", exclude_outliers=False, use_loss=True
        ),
    ]


def all_methods(grid: list[float]) -> list[Method]:
    """Everything, in report order: none, the torch grid, built-ins, candidates, gates."""
    default = candidate("recommended default", C.recommended)
    out = [no_clip()] + [torch_norm(v) for v in grid] + list(BUILTINS)
    out += CLIPOPT_SHIPPED
    out += candidate_methods()
    out += gate_methods(default)
    names = [m.name for m in out]
    assert len(names) == len(set(names)), "method names must be unique"
    return out
