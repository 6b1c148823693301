"""Report a trial's training curve, prune it, and record clipping statistics."""

from __future__ import annotations

import math
import typing
from typing import Literal

import numpy as np
import optuna
import torch

from .._attach import Attachment
from .._optimizer import ClippedOptimizer
from .._protocol import ClipStats
from .._validation import check_choice, check_int, check_range

#: Trial user attribute: the share of the trial's steps that clipped.
CLIP_RATE_ATTR = "clipopt:clip_rate"

NonfiniteObjective = Literal["prune", "penalize", "raise"]


class Diverged(Exception):  # noqa: N818  (an outcome, not a bug)
    """A trial's value went non-finite under ``on_nonfinite="penalize"``.

    :func:`tune` turns it into a COMPLETE trial with value ``penalty``; with plain Optuna,
    catch it and ``return error.penalty``.
    """

    def __init__(self, penalty: float, step: int | None = None) -> None:
        super().__init__(f"non-finite value at step {step}; penalized with {penalty}")
        self.penalty = penalty
        self.step = step


def _handle_nonfinite(
    trial: optuna.trial.BaseTrial,
    policy: NonfiniteObjective,
    penalty: float | None,
    value: float,
    step: int | None,
) -> None:
    trial.set_user_attr("clipopt:diverged_at", -1 if step is None else int(step))
    if policy == "prune":
        raise optuna.TrialPruned(f"non-finite value {value} at step {step}")
    if policy == "penalize":
        assert penalty is not None  # checked by the callers' constructors
        raise Diverged(penalty, step)
    raise ValueError(f"the objective value is not finite: {value} (step {step})")


#: What TrialReporter records from: the two front-ends of the clipping engine.
Recorded = ClippedOptimizer | Attachment


def _check_optimizer(optimizer: object) -> Recorded | None:
    if optimizer is None or isinstance(optimizer, Recorded):
        return optimizer
    kinds = typing.get_args(Recorded)
    names = " or ".join(f"clipopt.{kind.__name__}" for kind in kinds)
    raise TypeError(
        f"optimizer must be a {names} or None, got {type(optimizer).__name__}; "
        "wrap it, clipopt.ClippedOptimizer(optimizer, strategy), or keep it and "
        "attach the clipping, clipopt.attach(optimizer, strategy)"
    )


class TrialReporter:
    """Report a training curve to a trial, prune it, and record clipping statistics.

    ``report(value, step)`` calls ``trial.report``; a pruner's verdict counts only after
    ``warmup_fraction`` of ``total_steps`` (pruning early is biased against small
    thresholds, which start slower and often finish best). A non-finite value ends the
    trial: pruned (default), penalized (:class:`Diverged`) or raised.

    With an optimizer, the reporter records the pre-clip norm of every step the engine
    clipped (with a closure optimizer such as LBFGS, of every evaluation of the closure,
    as ``counts()["steps"]`` counts them; non-finite norms are left out) and writes,
    when the trial ends (pruned, diverged, or :meth:`finish`), JSON-safe user attributes:
    ``clipopt:clip_rate``, ``clipopt:steps``, ``clipopt:skipped_steps`` and the norm
    percentiles ``clipopt:grad_norm_p50``/``p90``/``p99``.

    Args:
        trial: The trial.
        optimizer: The trial's :class:`clipopt.ClippedOptimizer`, or the
            :class:`clipopt.Attachment` of :func:`clipopt.attach`, or None.
        total_steps: The last step value that will be reported; enables the warm-up.
        warmup_fraction: Share of ``total_steps`` before pruning may happen, in [0, 1].
        on_nonfinite: ``"prune"``, ``"penalize"`` or ``"raise"``.
        penalty: The value of a penalized trial (required with ``"penalize"``).

    Example:
        >>> import optuna, torch, clipopt, clipopt.tuning as ct
        >>> def objective(trial):
        ...     p = torch.nn.Parameter(torch.ones(2))
        ...     opt = clipopt.ClippedOptimizer(torch.optim.SGD([p], lr=0.1),
        ...                                    ct.suggest_strategy(trial))
        ...     reporter = ct.TrialReporter(trial, opt, total_steps=9)
        ...     for step in range(10):
        ...         opt.zero_grad()
        ...         loss = (p ** 2).sum()
        ...         loss.backward()
        ...         opt.step()
        ...         reporter.report(loss.item(), step)
        ...     return reporter.finish(loss.item())
        >>> optuna.logging.set_verbosity(optuna.logging.WARNING)
        >>> study = optuna.create_study()
        >>> study.optimize(objective, n_trials=2)
        >>> "clipopt:clip_rate" in study.trials[0].user_attrs
        True
    """

    def __init__(
        self,
        trial: optuna.trial.BaseTrial,
        optimizer: Recorded | None = None,
        *,
        total_steps: int | None = None,
        warmup_fraction: float = 0.4,
        on_nonfinite: NonfiniteObjective = "prune",
        penalty: float | None = None,
    ) -> None:
        self.trial = trial
        self.optimizer = _check_optimizer(optimizer)
        self.total_steps = (
            None
            if total_steps is None
            else check_int("total_steps", total_steps, minimum=0)
        )
        self.warmup_fraction = check_range("warmup_fraction", warmup_fraction, 0.0, 1.0)
        self.on_nonfinite: NonfiniteObjective = check_choice(  # type: ignore[assignment]
            "on_nonfinite", on_nonfinite, ("prune", "penalize", "raise")
        )
        if self.on_nonfinite == "penalize" and (
            penalty is None or not math.isfinite(penalty)
        ):
            raise ValueError(
                f"on_nonfinite='penalize' needs a finite penalty, got {penalty!r}"
            )
        self.penalty = penalty
        self._norms: list[torch.Tensor] = []
        # The engine's hook sees every step with gradients, whichever front-end clips.
        self._handle = (
            None
            if self.optimizer is None
            else self.optimizer.clipper.add_stats_hook(self._record_norm)
        )

    def _record_norm(self, stats: ClipStats, step: int) -> None:
        self._norms.append(stats.norm.detach())

    def may_prune(self, step: int) -> bool:
        """Whether the pruner's verdict counts at ``step`` (after the warm-up share)."""
        if self.total_steps is None:
            return True
        return step >= self.warmup_fraction * self.total_steps

    def report(self, value: float, step: int) -> None:
        """Report ``value`` at ``step``; raise ``optuna.TrialPruned`` to stop the trial.

        Raises:
            optuna.TrialPruned: The pruner stopped the trial, or the value is not finite
                under ``"prune"``.
            Diverged: The value is not finite under ``"penalize"``.
            ValueError: The value is not finite under ``"raise"``.
        """
        value = float(value)
        if not math.isfinite(value):
            self.record()
            _handle_nonfinite(self.trial, self.on_nonfinite, self.penalty, value, step)
        self.trial.report(value, step)
        if self.may_prune(step) and self.trial.should_prune():
            self.record()
            raise optuna.TrialPruned(f"pruned at step {step}")

    def record(self) -> dict[str, float]:
        """Write the clipping statistics as user attributes and return them."""
        attrs: dict[str, float] = {}
        if self.optimizer is not None:
            counts = self.optimizer.counts()
            attrs["clipopt:steps"] = float(counts["steps"])
            attrs["clipopt:skipped_steps"] = float(counts["skipped_steps"])
            attrs[CLIP_RATE_ATTR] = float(
                counts["clipped_steps"] / counts["steps"] if counts["steps"] else 0.0
            )
        if self._norms:
            norms = torch.stack(self._norms).double().cpu().numpy()
            norms = norms[np.isfinite(norms)]
            if norms.size:
                for q in (50, 90, 99):
                    attrs[f"clipopt:grad_norm_p{q}"] = float(np.percentile(norms, q))
        for key, value in attrs.items():
            self.trial.set_user_attr(key, value)
        return attrs

    def finish(self, value: float) -> float:
        """Record the statistics, stop listening to the optimizer, and return ``value``.

        A non-finite ``value`` is handled by ``on_nonfinite``, as in :meth:`report`.
        """
        self.record()
        self.close()
        value = float(value)
        if not math.isfinite(value):
            _handle_nonfinite(self.trial, self.on_nonfinite, self.penalty, value, None)
        return value

    def close(self) -> None:
        """Remove the step hook from the optimizer."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
