"""Summarise a study: the best trial, the best per strategy, and the baselines."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import optuna
from optuna.trial import TrialState

from .._protocol import ClipStrategy
from ..strategies import NormClip
from ._budget import excluded_numbers
from .reporting import CLIP_RATE_ATTR
from .space import NONE, strategy_from_params
from .study import _BASELINE_TAG


@dataclass(frozen=True)
class _Row:
    label: str
    strategy: str
    params: dict[str, float]
    value: float | None
    state: str
    number: int = -1
    clip_rate: float | None = None

    @property
    def never_clipped(self) -> bool:
        """A clipping strategy whose trial clipped no step: it acted as no clipping."""
        return self.strategy != NONE and self.clip_rate == 0.0


@dataclass(frozen=True)
class TuningSummary:
    """The outcome of a study: the best strategy, and how it compares with baselines.

    ``str(summary)`` is a markdown table. Improvements are relative to the baseline's
    value, positive when the best trial is better (lower when minimising). Each row
    shows its trial's clip rate (the ``clipopt:clip_rate`` that :class:`TrialReporter`
    records); a clipping strategy whose trial never clipped is flagged, because it
    trained exactly as no clipping would.

    Attributes:
        best: The best trial as a row (label, strategy, params, value, state).
        baselines: The baseline trials (no clipping, max_norm=1.0, ...) found.
        per_strategy: The best finished trial of each strategy.
        direction: ``"minimize"`` or ``"maximize"``.
        counts: Number of trials per state.
    """

    best: _Row
    baselines: list[_Row] = field(default_factory=list)
    per_strategy: list[_Row] = field(default_factory=list)
    direction: str = "minimize"
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def best_strategy(self) -> str:
        """The best trial's strategy name."""
        return self.best.strategy

    @property
    def best_params(self) -> dict[str, float]:
        """The best trial's strategy parameters (unprefixed)."""
        return dict(self.best.params)

    def improvement_over(self, label: str) -> float | None:
        """Relative improvement of the best value over a baseline, or None."""
        for row in self.baselines:
            if (
                row.label == label
                and row.value is not None
                and self.best.value is not None
                and row.value != 0
            ):
                gain = row.value - self.best.value
                if self.direction == "maximize":
                    gain = -gain
                return gain / abs(row.value)
        return None

    @property
    def never_clipped(self) -> list[str]:
        """Strategies whose shown trial (best, or best of its strategy) never clipped."""
        rows = [self.best, *self.per_strategy]
        return [f"{r.strategy} ({r.label})" for r in rows if r.never_clipped]

    def to_markdown(self) -> str:
        """Return the summary as a markdown table."""

        def fmt_params(params: Mapping[str, float]) -> str:
            return ", ".join(f"{k}={v:.4g}" for k, v in params.items()) or "-"

        def fmt_value(row: _Row) -> str:
            return "-" if row.value is None else f"{row.value:.4g}"

        def fmt_rate(row: _Row) -> str:
            if row.clip_rate is None:
                return "-"
            return f"{row.clip_rate:.0%}" + (
                " (never clipped)" if row.never_clipped else ""
            )

        better = "lower" if self.direction == "minimize" else "higher"
        lines = [
            f"| trial | strategy | parameters | value | clip rate | best is {better} by |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        sign = 1 if self.direction == "minimize" else -1
        for row in [self.best, *self.per_strategy, *self.baselines]:
            if row is self.best:
                versus = "(best)"
            elif row.value is None:
                versus = row.state.lower()
            elif self.best.value is not None and row.value != 0:
                versus = f"{sign * (row.value - self.best.value) / abs(row.value):.1%}"
            else:
                versus = "-"
            lines.append(
                f"| {row.label} | {row.strategy} | {fmt_params(row.params)} | "
                f"{fmt_value(row)} | {fmt_rate(row)} | {versus} |"
            )
        notes = []
        for label in ("no clipping", "max_norm=1.0"):
            gain = self.improvement_over(label)
            if gain is not None:
                notes.append(f"improvement over {label}: {gain:.1%}")
        if self.never_clipped:
            notes.append(
                "never clipped, so the same as no clipping: "
                + ", ".join(self.never_clipped)
            )
        counts = ", ".join(f"{v} {k.lower()}" for k, v in self.counts.items())
        return "\n".join([*lines, "", f"trials: {counts}", *notes])

    def __str__(self) -> str:
        return self.to_markdown()


def _row(
    trial: optuna.trial.FrozenTrial,
    label: str,
    strategies: Sequence[str] | None,
    prefix: str,
) -> _Row:
    strategy = strategy_from_params(trial.params, strategies=strategies, prefix=prefix)
    name = trial.params.get(f"{prefix}_strategy")
    if name is None:
        name = strategy.name if not _is_none(strategy) else NONE
    lead = f"{prefix}_{name}_"
    params = {
        k[len(lead) :]: float(v) for k, v in trial.params.items() if k.startswith(lead)
    }
    value = trial.value if trial.state == TrialState.COMPLETE else None
    rate = trial.user_attrs.get(CLIP_RATE_ATTR)
    return _Row(
        label,
        str(name),
        params,
        value,
        trial.state.name,
        trial.number,
        None if rate is None else float(rate),
    )


def _is_none(strategy: ClipStrategy) -> bool:
    return isinstance(strategy, NormClip) and strategy.max_norm == math.inf


def summarize(
    study: optuna.Study, *, strategies: Sequence[str] | None = None, prefix: str = "clip"
) -> TuningSummary:
    """Summarise a study: best trial, best per strategy, baselines and improvements.

    Raises:
        ValueError: The study has no completed trial.
    """
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise ValueError("the study has no completed trial yet")
    best = study.best_trial
    best_row = _row(best, f"#{best.number}", strategies, prefix)
    trials = study.get_trials(deepcopy=False)
    excluded = excluded_numbers(trials)  # a killed and retried baseline shows once
    baselines = [
        _row(t, str(t.user_attrs[_BASELINE_TAG]), strategies, prefix)
        for t in trials
        if _BASELINE_TAG in t.user_attrs
        and t.state != TrialState.WAITING
        and t.number not in excluded
    ]
    shown = {best.number} | {b.number for b in baselines}
    per_strategy: dict[str, _Row] = {}
    sign = 1 if study.direction == optuna.study.StudyDirection.MINIMIZE else -1
    for trial in sorted(complete, key=lambda t: sign * float(t.value or 0.0)):
        row = _row(
            trial, f"best {trial.params.get(f'{prefix}_strategy', '')}", strategies, prefix
        )
        if row.strategy != best_row.strategy and row.strategy not in per_strategy:
            per_strategy[row.strategy] = row
    per_strategy = {k: r for k, r in per_strategy.items() if r.number not in shown}
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return TuningSummary(
        best_row,
        baselines,
        list(per_strategy.values()),
        "minimize" if sign == 1 else "maximize",
        counts,
    )
