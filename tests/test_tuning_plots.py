"""save_plots: object API only, readable log axes, every trial, degenerate panels."""

import json
import subprocess
import sys

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from clipopt.tuning.plots import _degenerate_note, _draw

STRATEGY = CategoricalDistribution(("none", "norm", "percentile", "value"))
DISTRIBUTIONS = {
    "norm": ("clip_norm_max_norm", FloatDistribution(1e-2, 1e2, log=True)),
    "percentile": ("clip_percentile_percentile", FloatDistribution(1.0, 99.0)),
    "value": ("clip_value_clip_value", FloatDistribution(1e-3, 10.0, log=True)),
}


def add(study, strategy, x=None, value=None, state=TrialState.COMPLETE, curve=None):
    params, distributions = {"clip_strategy": strategy}, {"clip_strategy": STRATEGY}
    if strategy in DISTRIBUTIONS:
        name, dist = DISTRIBUTIONS[strategy]
        params[name], distributions[name] = x, dist
    study.add_trial(
        create_trial(
            state=state,
            value=value if state == TrialState.COMPLETE else None,
            params=params,
            distributions=distributions,
            intermediate_values=curve or {},
        )
    )


def scatter_points(ax, label_start):
    for collection, text in zip(ax.collections, ax.get_legend().get_texts(), strict=False):
        if text.get_text().startswith(label_start):
            return [tuple(p) for p in collection.get_offsets()]
    raise AssertionError(f"no scatter labelled {label_start!r}")


@pytest.fixture
def study():
    study = optuna.create_study()
    add(study, "none", value=3.0, curve={0: 5.0, 1: 3.0})
    for x, v in [(0.2, 0.5), (0.3, 0.4), (0.25, 0.45)]:  # 0.2-0.3: less than a decade
        add(study, "norm", x, v, curve={0: 2.0, 1: v})
    add(study, "norm", 0.22, state=TrialState.PRUNED, curve={0: 2.5, 1: 2.2})
    for p in (10.0, 50.0):
        add(study, "percentile", p, 1.0, curve={0: 1.0})  # all the same value
    add(study, "value", 0.1, state=TrialState.PRUNED)  # nothing finite at all
    return study


def test_pruned_trials_are_drawn_at_their_last_value(study):
    ax = _draw(study, None, "clip", None)["objective_vs_threshold"].axes[0]
    assert ax.get_title().startswith("norm")
    assert scatter_points(ax, "pruned") == [(0.22, 2.2)]
    assert len(scatter_points(ax, "complete")) == 3
    curves = _draw(study, None, "clip", None)["intermediate_values"].axes[0]
    assert "pruned (x: last value)" in [
        t.get_text() for t in curves.get_legend().get_texts()
    ]


def test_log_axes_label_majors_only_and_readably(study):
    fig = _draw(study, None, "clip", None)["objective_vs_threshold"]
    fig.canvas.draw()
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    majors = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert majors  # a span below one decade still has labels (1-2-5 ticks)...
    values = [float(m) for m in majors]  # plain numbers, not 2x10^-1
    assert 2 <= len(values) <= 8
    assert min(values) <= 0.2
    assert max(values) >= 0.3
    assert [t.get_text() for t in ax.xaxis.get_minorticklabels() if t.get_text()] == []


def test_degenerate_panels_are_drawn_with_a_note(study):
    fig = _draw(study, None, "clip", None)["objective_vs_threshold"]
    titles = [ax.get_title().split(":")[0] for ax in fig.axes]
    assert titles == ["norm", "percentile", "value"]
    notes = {
        ax.get_title().split(":")[0]: [t.get_text() for t in ax.texts] for ax in fig.axes
    }
    assert notes["percentile"] == ["all 2 trials scored 1"]
    assert notes["value"] == ["no finite value (1 trial)"]
    assert notes["norm"] == []
    assert _degenerate_note(1, [0.5], 0) == "one trial: 0.5"


def test_axis_labels_name_the_objective(study):
    fig = _draw(study, None, "clip", None)["objective_vs_threshold"]
    assert fig.axes[0].get_ylabel() == "objective"
    with pytest.warns(optuna.exceptions.ExperimentalWarning):
        study.set_metric_names(["val_loss"])
    figures = _draw(study, None, "clip", None)
    assert figures["objective_vs_threshold"].axes[0].get_ylabel() == "val_loss"
    assert figures["intermediate_values"].axes[0].get_ylabel() == "val_loss (reported)"
    fig = _draw(study, None, "clip", "MSE")["objective_vs_threshold"]
    assert fig.axes[0].get_ylabel() == "MSE"


def test_no_global_backend_and_no_pyplot(tmp_path):
    code = f"""
import json, sys, matplotlib, optuna, torch, clipopt, clipopt.plots, clipopt.tuning as ct
optuna.logging.set_verbosity(optuna.logging.WARNING)
backend = matplotlib.rcParams._get_backend_or_none()
study = ct.tune(lambda trial, strategy: 1.0, n_trials=3, show_progress_bar=False)
files = ct.save_plots(study, {str(tmp_path)!r})
p = torch.nn.Parameter(torch.zeros(2))
opt = clipopt.ClippedOptimizer(torch.optim.SGD([p], lr=0.1), "norm", max_norm=1.0)
history = clipopt.StatsHistory(opt)
p.grad = torch.ones(2)
opt.step()
clipopt.plots.plot_stats(history, {str(tmp_path / "s.png")!r})
print(json.dumps([backend == matplotlib.rcParams._get_backend_or_none(),
                  "matplotlib.pyplot" in sys.modules, [f.name for f in files]]))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    same_backend, pyplot, files = json.loads(out.stdout.strip().splitlines()[-1])
    assert same_backend
    assert not pyplot
    assert files == ["objective_vs_threshold.png", "intermediate_values.png"]
    assert (tmp_path / "s.png").read_bytes().startswith(b"\x89PNG")
