"""PNG plots of a study: the objective against the threshold, and training curves."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

import optuna
from optuna.trial import TrialState

from .space import DEFAULT_SPACES, NONE
from .summary import _Row, _row


def save_plots(
    study: optuna.Study,
    directory: str | os.PathLike[str],
    *,
    strategies: Sequence[str] | None = None,
    prefix: str = "clip",
) -> list[pathlib.Path]:
    """Save PNG plots of a study: objective against threshold, and training curves.

    Writes ``objective_vs_threshold.png`` (one panel per strategy with a parameter, log
    axes for log-uniform thresholds, no clipping as a line) and
    ``intermediate_values.png`` (every trial's reported curve, pruned ones dashed).
    Needs matplotlib (in ``clipopt[optuna]``).

    Returns:
        The written files.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    rows = [_row(t, f"#{t.number}", strategies, prefix) for t in trials]
    by_strategy: dict[str, list[_Row]] = {}
    for row in rows:
        by_strategy.setdefault(row.strategy, []).append(row)
    panels = [s for s, rs in by_strategy.items() if any(r.params for r in rs)]
    written = []

    fig, axes = plt.subplots(
        1,
        max(len(panels), 1),
        figsize=(4.2 * max(len(panels), 1), 3.4),
        dpi=110,
        squeeze=False,
    )
    none_values = [r.value for r in by_strategy.get(NONE, []) if r.value is not None]
    minimize = study.direction == optuna.study.StudyDirection.MINIMIZE
    for ax, strategy in zip(axes[0], panels, strict=False):
        param = next(iter(by_strategy[strategy][0].params))
        points = [
            (r.params[param], r.value) for r in by_strategy[strategy] if r.value is not None
        ]
        xs = [x for x, _ in points]
        ys = [y for _, y in points]
        ax.scatter(xs, ys, s=18, color="tab:blue", label="trials")
        best_x, best_y = (min if minimize else max)(points, key=lambda p: p[1])
        ax.scatter([best_x], [best_y], s=60, color="tab:red", marker="*", label="best")
        low_high = DEFAULT_SPACES.get(strategy, {}).get(param)
        if low_high is not None and low_high[2]:
            ax.set_xscale("log")
        if none_values:
            ax.axhline(min(none_values), color="0.4", ls="--", lw=1, label="no clipping")
        ax.set_yscale("log")
        ax.set_xlabel(param)
        ax.set_ylabel("objective")
        ax.set_title(strategy, fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "objective_vs_threshold.png"
    fig.savefig(path)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    colors = {s: f"C{i}" for i, s in enumerate(sorted(by_strategy) or [NONE])}
    for trial in study.get_trials(
        deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)
    ):
        values = trial.intermediate_values
        if not values:
            continue
        steps = sorted(values)
        name = str(trial.params.get(f"{prefix}_strategy", next(iter(colors))))
        ax.plot(
            steps,
            [values[s] for s in steps],
            color=colors.get(name, "0.5"),
            ls="-" if trial.state == TrialState.COMPLETE else ":",
            lw=1,
            alpha=0.8,
        )
    for name, color in colors.items():
        ax.plot([], [], color=color, label=name)
    ax.plot([], [], color="0.3", ls=":", label="pruned")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("reported value")
    ax.set_title("Intermediate values per trial", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = out / "intermediate_values.png"
    fig.savefig(path)
    plt.close(fig)
    written.append(path)
    return written
