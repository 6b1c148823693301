"""PNG plots of a study: the objective against the threshold, and training curves.

Drawn with matplotlib's object API (``Figure`` and the Agg canvas): no global backend
is switched, so inline plots in a notebook keep working.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from .space import NONE, param_name
from .summary import _row

_PRUNED: dict[str, Any] = {"marker": "x", "s": 22, "color": "0.35", "linewidths": 1.0}


def _last_value(trial: FrozenTrial) -> float | None:
    """A COMPLETE trial's value, a PRUNED one's last reported value, or None."""
    if trial.state == TrialState.COMPLETE:
        return None if trial.value is None else float(trial.value)
    if not trial.intermediate_values:
        return None
    return float(trial.intermediate_values[max(trial.intermediate_values)])


def _finite(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _log_ticks(axis: Any, low: float, high: float) -> None:
    """Readable log ticks: plain labels at 1-2-5 (short spans) or at decades only."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    decades = math.log10(high / low) if 0 < low < high else 0.0
    subs = (1.0,) if decades >= 2 else (1.0, 2.0, 5.0)
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    axis.set_minor_locator(LogLocator(base=10, subs=tuple(range(2, 10))))
    axis.set_minor_formatter(NullFormatter())


def _y_scale(ax: Any, values: list[float]) -> None:
    """Log y when every value is positive and they span more than a factor of 10."""
    if values and min(values) > 0 and max(values) / min(values) > 10:
        ax.set_yscale("log")
        _log_ticks(ax.yaxis, min(values), max(values))


def _save(fig: Any, path: pathlib.Path) -> pathlib.Path:
    fig.tight_layout()
    fig.savefig(path)
    return path


def save_plots(
    study: optuna.Study,
    directory: str | os.PathLike[str],
    *,
    strategies: Sequence[str] | None = None,
    prefix: str = "clip",
    objective_name: str | None = None,
) -> list[pathlib.Path]:
    """Save PNG plots of a study: objective against threshold, and training curves.

    Writes ``objective_vs_threshold.png``, one panel per strategy with a parameter (log
    axes for log-uniform parameters, no clipping's best value as a line), and
    ``intermediate_values.png``, every trial's reported curve. Every finished trial is
    shown: pruned ones at their last reported value, with an ``x``. A panel whose trials
    all scored the same value, that has one trial, or no finite value is still drawn,
    with a note. Needs matplotlib (in ``clipopt[optuna]``).

    Args:
        study: The study.
        directory: Folder to write into (created if missing).
        strategies: The searched strategies (only needed for a single strategy
            without parameters, see :func:`strategy_from_params`).
        prefix: Prefix of the parameter names.
        objective_name: Axis label of the objective (default: the study's metric name,
            from ``study.set_metric_names``, else ``"objective"``).

    Returns:
        The written files.
    """
    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    figures = _draw(study, strategies, prefix, objective_name)
    return [_save(fig, out / f"{name}.png") for name, fig in figures.items()]


def _draw(
    study: optuna.Study,
    strategies: Sequence[str] | None,
    prefix: str,
    objective_name: str | None,
) -> dict[str, Any]:
    """The figures of :func:`save_plots`, by file stem."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if objective_name is None:
        objective_name = (study.metric_names or ["objective"])[0]
    trials = study.get_trials(
        deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)
    )
    rows = [(t, _row(t, f"#{t.number}", strategies, prefix)) for t in trials]
    names = sorted({row.strategy for _, row in rows}) or [NONE]
    colors = {name: f"C{i}" for i, name in enumerate(names)}
    minimize = study.direction == optuna.study.StudyDirection.MINIMIZE
    none_best = _finite([t.value for t, r in rows if r.strategy == NONE])
    panels = [s for s in names if any(r.params for _, r in rows if r.strategy == s)]

    fig = Figure(figsize=(4.2 * max(len(panels), 1), 3.6), dpi=110)
    axes = fig.subplots(1, max(len(panels), 1), squeeze=False)[0]
    for ax, strategy in zip(axes, panels, strict=False):
        own = [(t, r) for t, r in rows if r.strategy == strategy]
        param = next(iter(own[0][1].params))
        complete: list[tuple[float, float]] = []
        pruned: list[tuple[float, float]] = []
        diverged = 0
        for trial, row in own:
            y = _last_value(trial)
            if y is None or not math.isfinite(y):
                diverged += 1
            else:
                point = (row.params[param], y)
                (complete if trial.state == TrialState.COMPLETE else pruned).append(point)
        for points, style in (
            (complete, {"s": 18, "color": colors[strategy]}),
            (pruned, _PRUNED),
        ):
            label = "complete" if points is complete else "pruned, last value"
            ax.scatter(
                [x for x, _ in points],
                [y for _, y in points],
                label=f"{label} ({len(points)})",
                **style,
            )
        if complete:
            best = (min if minimize else max)(complete, key=lambda p: p[1])
            ax.scatter(*best, s=90, color="tab:red", marker="*", zorder=3, label="best")
        if none_best:
            best_none = (min if minimize else max)(none_best)
            ax.axhline(best_none, color="0.4", ls="--", lw=1, label="no clipping")
        xs = [row.params[param] for _, row in own]
        own_values = [y for _, y in complete + pruned]
        distribution = own[0][0].distributions.get(param_name(strategy, param, prefix))
        if getattr(distribution, "log", False) and min(xs) > 0:
            ax.set_xscale("log")
            low, high = min(xs), max(xs)
            if low == high:
                low, high = low / 2, high * 2
            ax.set_xlim(low / 1.3, high * 1.3)
            _log_ticks(ax.xaxis, low, high)
        _y_scale(ax, own_values + none_best)
        note = _degenerate_note(len(own), own_values, diverged)
        if note:
            ax.text(
                0.5,
                0.5,
                note,
                transform=ax.transAxes,
                ha="center",
                va="center",
                fontsize=8,
                color="0.3",
                bbox={"fc": "white", "ec": "0.7"},
            )
        ax.set_xlabel(param)
        ax.set_ylabel(objective_name)
        ax.set_title(f"{strategy}: {objective_name} against {param}", fontsize=9)
        ax.legend(fontsize=7)
    if not panels:
        message = "no strategy with a parameter was tried"
        axes[0].text(0.5, 0.5, message, transform=axes[0].transAxes, ha="center")
    FigureCanvasAgg(fig)
    figures = {"objective_vs_threshold": fig}

    fig = Figure(figsize=(7.5, 3.8), dpi=110)
    ax = fig.subplots()
    values: list[float] = []
    for trial, row in rows:
        steps = sorted(trial.intermediate_values)
        curve = [trial.intermediate_values[s] for s in steps]
        values += _finite(curve)
        if not steps:
            continue
        was_pruned = trial.state == TrialState.PRUNED
        color = colors[row.strategy]
        ax.plot(steps, curve, color=color, ls=":" if was_pruned else "-", lw=1, alpha=0.8)
        if was_pruned:
            ax.scatter([steps[-1]], [curve[-1]], **{**_PRUNED, "color": color})
    for name, color in colors.items():
        ax.plot([], [], color=color, label=name)
    ax.plot([], [], color="0.35", ls="-", label="complete")
    ax.plot([], [], color="0.35", ls=":", marker="x", label="pruned (x: last value)")
    _y_scale(ax, values)
    ax.set_xlabel("step")
    ax.set_ylabel(f"{objective_name} (reported)")
    ax.set_title(f"Reported {objective_name} per trial, coloured by strategy", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    FigureCanvasAgg(fig)
    figures["intermediate_values"] = fig
    return figures


def _degenerate_note(n_trials: int, values: list[float], n_nonfinite: int) -> str:
    """A note for a panel that cannot show a trend, or an empty string."""
    notes = []
    if not values:
        notes.append(f"no finite value ({n_trials} trial{'s' if n_trials != 1 else ''})")
    elif n_trials == 1:
        notes.append(f"one trial: {values[0]:.4g}")
    elif max(values) == min(values):
        notes.append(f"all {n_trials} trials scored {values[0]:.4g}")
    if n_nonfinite and values:
        notes.append(f"{n_nonfinite} without a finite value (not drawn)")
    return "\n".join(notes)
