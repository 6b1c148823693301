import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState

import clipopt
import clipopt.tuning as ct

ROOT = pathlib.Path(__file__).parent.parent


@pytest.fixture(autouse=True)
def quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def tiny_objective(trial, strategy, steps=12):
    """Deterministic: a small regression with spikes, trained with the strategy."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = clipopt.ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), strategy)
    g = torch.Generator().manual_seed(1)
    reporter = ct.TrialReporter(trial, opt, total_steps=steps)
    for step in range(steps):
        x = torch.randn(16, 4, generator=g)
        y = x.sum(1, keepdim=True) * (30.0 if step % 4 == 3 else 1.0)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        reporter.report(loss.item(), step)
    with torch.no_grad():
        x = torch.randn(64, 4, generator=g)
        value = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True)).item()
    return reporter.finish(value)


def test_import_without_optuna_names_the_extra():
    code = "import sys; sys.modules['optuna'] = None; import clipopt.tuning"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode != 0
    assert "pip install 'clipopt[optuna]'" in out.stderr


def test_parameter_names_are_distinct_and_conditional():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    strategies = ("none", "norm", "value", "percentile", "zscore", "adagc", "agc")
    seen = {}
    for _ in range(40):
        trial = study.ask()
        strategy = ct.suggest_strategy(trial, strategies)
        chosen = trial.params["clip_strategy"]
        own = {k for k in trial.params if k != "clip_strategy"}
        assert all(k.startswith(f"clip_{chosen}_") for k in own)
        seen[chosen] = own
        assert isinstance(strategy, clipopt.ClipStrategy)
        study.tell(trial, 1.0)
    names = [n for params in seen.values() for n in params]
    assert len(names) == len(set(names))
    assert seen["norm"] == {"clip_norm_max_norm"}
    assert seen["none"] == set()


def test_thresholds_are_log_uniform_and_overridable():
    trial = optuna.create_study().ask()
    ct.suggest_strategy(trial, ("norm",), spaces={"norm": {"max_norm": (0.5, 2.0, True)}})
    dist = trial.distributions["clip_norm_max_norm"]
    assert dist.log
    assert (dist.low, dist.high) == (0.5, 2.0)
    trial = optuna.create_study().ask()
    ct.suggest_strategy(trial, ("value",))
    assert trial.distributions["clip_value_clip_value"].log


def test_every_built_in_strategy_has_a_search_space():
    built_in = {"relative", "norm", "value", "percentile", "zscore", "adagc", "agc"}
    assert built_in <= set(clipopt.available_strategies())
    assert set(ct.DEFAULT_SPACES) == built_in | {"none"}
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    strategy = ct.suggest_strategy(trial, ("relative",))  # the default, its ratio tuned
    assert isinstance(strategy, clipopt.RelativeClip)
    assert 0.05 <= strategy.ratio <= 2.0
    assert trial.distributions["clip_relative_ratio"].log
    rebuilt = ct.strategy_from_params(trial.params)
    assert isinstance(rebuilt, clipopt.RelativeClip)
    assert rebuilt.ratio == strategy.ratio


def test_fixed_trial_replays_the_best_strategy_exactly():
    study = ct.tune(
        tiny_objective,
        n_trials=8,
        seed=0,
        worker_id=0,
        show_progress_bar=False,
        strategies=("none", "norm", "percentile"),
    )
    best = study.best_trial
    fixed = optuna.trial.FixedTrial(best.params)
    strategy = ct.suggest_strategy(fixed, ("none", "norm", "percentile"))
    assert repr(strategy) == repr(ct.strategy_from_params(best.params))
    assert tiny_objective(fixed, strategy) == best.value


def test_strategy_from_params_single_strategy_and_errors():
    assert ct.strategy_from_params({"clip_norm_max_norm": 0.3, "lr": 1e-3}).max_norm == 0.3
    assert ct.strategy_from_params({}, strategies=("none",)).max_norm == math.inf
    with pytest.raises(ValueError, match="cannot tell the strategy"):
        ct.strategy_from_params({"lr": 0.1})
    with pytest.raises(ValueError, match="unknown strategies"):
        ct.suggest_strategy(optuna.trial.FixedTrial({}), ("nrom",))
    clipopt.register_strategy("test-tuning-unspaced")(
        type("Unspaced", (clipopt.NormClip,), {})
    )
    trial = optuna.create_study().ask()
    with pytest.raises(ValueError, match="no search space for strategy"):
        ct.suggest_strategy(trial, ("test-tuning-unspaced",))


def test_study_on_sqlite_with_json_safe_attributes(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = ct.tune(
        tiny_objective,
        n_trials=6,
        storage=url,
        study_name="s",
        seed=0,
        show_progress_bar=False,
    )
    loaded = optuna.load_study(study_name="s", storage=url)
    finished = [
        t for t in loaded.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
    ]
    assert len(finished) == 6
    for trial in finished:
        for key in ("clipopt:clip_rate", "clipopt:steps", "clipopt:grad_norm_p50"):
            assert isinstance(trial.user_attrs[key], float)
        json.dumps(trial.user_attrs)
    labels = {t.user_attrs.get("clipopt:baseline") for t in loaded.trials}
    assert {"no clipping", "max_norm=1.0", "percentile=10"} <= labels
    assert study.best_value == loaded.best_value


def test_global_budget_resume_and_baselines_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    kwargs = dict(storage=url, study_name="s", seed=0, show_progress_bar=False)
    ct.tune(tiny_objective, n_trials=5, **kwargs)
    study = ct.tune(tiny_objective, n_trials=5, **kwargs)  # budget reached: nothing runs
    assert len(study.trials) == 5
    study = ct.tune(tiny_objective, n_trials=8, **kwargs)  # resume: three more
    assert ct.count_finished(study) == 8
    baselines = [t for t in study.trials if "clipopt:baseline" in t.user_attrs]
    assert len(baselines) == 3
    seeds = {t.user_attrs["clipopt:sampler_seed"] for t in study.trials}
    assert len(seeds) == 2  # a distinct seed for the resumed run


def test_diverging_trial_is_pruned_not_failed():
    def objective(trial, strategy):
        return (
            math.nan
            if ct.strategy_from_params(trial.params, strategies=("none", "norm")).max_norm
            == math.inf
            else 1.0
        )

    study = ct.tune(
        objective, n_trials=4, strategies=("none", "norm"), show_progress_bar=False
    )
    states = {t.user_attrs.get("clipopt:baseline"): t.state for t in study.trials}
    assert states["no clipping"] == TrialState.PRUNED
    assert all(t.state != TrialState.FAIL for t in study.trials)


def test_reporter_nonfinite_policies():
    def diverging(trial, strategy):
        p = torch.nn.Parameter(torch.ones(1))
        opt = clipopt.ClippedOptimizer(torch.optim.SGD([p], lr=0.1), strategy)
        reporter = ct.TrialReporter(trial, opt, on_nonfinite=policy, penalty=penalty)
        reporter.report(1.0, 0)
        reporter.report(math.inf, 1)
        return 0.0

    policy, penalty = "prune", None
    study = ct.tune(diverging, n_trials=2, strategies=("norm",), show_progress_bar=False)
    assert {t.state for t in study.trials} == {TrialState.PRUNED}
    assert study.trials[0].user_attrs["clipopt:diverged_at"] == 1

    policy, penalty = "penalize", 99.0
    study = ct.tune(diverging, n_trials=2, strategies=("norm",), show_progress_bar=False)
    assert [t.value for t in study.trials] == [99.0, 99.0]
    assert all(t.user_attrs["clipopt:penalized"] for t in study.trials)

    policy, penalty = "raise", None
    with pytest.raises(ValueError, match="not finite"):
        ct.tune(diverging, n_trials=1, strategies=("norm",), show_progress_bar=False)

    with pytest.raises(ValueError, match="needs a finite penalty"):
        ct.tune(diverging, n_trials=1, on_nonfinite="penalize", show_progress_bar=False)


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial):
        return True


def test_reporter_waits_for_the_warmup_share_before_pruning():
    study = optuna.create_study(pruner=AlwaysPrune())
    trial = study.ask()
    reporter = ct.TrialReporter(trial, total_steps=10, warmup_fraction=0.4)
    for step in range(4):
        reporter.report(1.0, step)  # steps 0-3 < 40% of 10: the pruner is not asked
    with pytest.raises(optuna.TrialPruned):
        reporter.report(1.0, 4)


def test_probe_and_store_range_first_writer_wins():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    sgd = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    before = [p.detach().clone() for p in model.parameters()]

    def train_step(opt):
        opt.zero_grad()
        x = torch.randn(8, 4, generator=g)
        torch.nn.functional.mse_loss(model(x), 10 * x.sum(1, keepdim=True)).backward()
        opt.step()

    probe = ct.probe_grad_norms(train_step, clipopt.ClippedOptimizer(sgd), n_steps=20)
    assert len(probe.norms) == 20
    assert not all(
        torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)
    )
    p = probe.percentiles
    assert p[1] <= p[5] <= p[50] <= p[95] <= p[99]
    low, high = probe.suggested_range()
    assert low == pytest.approx(p[5] / 10)
    assert high == pytest.approx(p[99] * 2)
    study = optuna.create_study()
    assert ct.store_probe(study, probe) == (low, high)
    other = ct.GradNormProbe((1.0, 2.0, 3.0))
    assert ct.store_probe(study, other) == (low, high)  # first writer wins
    assert ct.store_probe(study, other, overwrite=True) != (low, high)
    trial = study.ask()
    ct.suggest_strategy(trial, ("norm",))
    dist = trial.distributions["clip_norm_max_norm"]
    assert (dist.low, dist.high) == ct.norm_range(study)


def test_probe_counts_nonfinite_steps():
    p = torch.nn.Parameter(torch.zeros(2))
    values = iter([1.0, math.nan, 3.0])

    def train_step(opt):
        p.grad = torch.full((2,), next(values))
        opt.step()

    probe = ct.probe_grad_norms(train_step, torch.optim.SGD([p], lr=0.1), n_steps=3)
    assert probe.n_nonfinite == 1
    assert len(probe.norms) == 2
    with pytest.raises(ValueError, match="no finite gradient norm"):
        ct.GradNormProbe(()).percentile(50)


def test_summary_and_plots(tmp_path):
    study = ct.tune(
        tiny_objective, n_trials=8, seed=1, worker_id=0, show_progress_bar=False
    )
    summary = ct.summarize(study)
    text = str(summary)
    assert text.splitlines()[0].startswith("| trial | strategy |")
    assert "no clipping" in text
    assert summary.best.value == study.best_value
    gain = summary.improvement_over("no clipping")
    none_value = next(b.value for b in summary.baselines if b.label == "no clipping")
    if none_value is not None:
        assert gain == pytest.approx((none_value - study.best_value) / abs(none_value))
    files = ct.save_plots(study, tmp_path / "plots")
    assert [f.name for f in files] == [
        "objective_vs_threshold.png",
        "intermediate_values.png",
    ]
    assert all(f.read_bytes().startswith(b"\x89PNG") for f in files)
    with pytest.raises(ValueError, match="no completed trial"):
        ct.summarize(optuna.create_study())


def test_make_storage_kinds(tmp_path):
    assert ct.make_storage(None) is None
    assert isinstance(ct.make_storage(str(tmp_path / "a.db")), optuna.storages.RDBStorage)
    assert isinstance(
        ct.make_storage(str(tmp_path / "a.log")), optuna.storages.JournalStorage
    )
    storage = optuna.storages.InMemoryStorage()
    assert ct.make_storage(storage) is storage


def test_journal_storage_study(tmp_path):
    study = ct.tune(
        tiny_objective,
        n_trials=4,
        storage=str(tmp_path / "j.log"),
        study_name="j",
        show_progress_bar=False,
    )
    assert ct.count_finished(study) == 4


def test_tune_validates_arguments():
    with pytest.raises(ValueError, match="n_trials must be >= 1"):
        ct.tune(tiny_objective, n_trials=0)
    with pytest.raises(ValueError, match="direction must be one of"):
        ct.tune(tiny_objective, n_trials=1, direction="down")
    with pytest.raises(ValueError, match="strategies must be a non-empty sequence"):
        ct.tune(tiny_objective, n_trials=1, strategies="norm")


def test_summary_shows_clip_rates_and_flags_strategies_that_never_clipped():
    study = ct.tune(
        tiny_objective,
        n_trials=6,
        strategies=("norm", "percentile"),
        # max_norm above every gradient norm of the tiny problem: norm never clips
        spaces={"norm": {"max_norm": (1e5, 1e6, True)}},
        baselines=False,
        show_progress_bar=False,
        worker_id=0,
        seed=0,
    )
    summary = ct.summarize(study)
    by_strategy = {r.strategy: r for r in [summary.best, *summary.per_strategy]}
    assert by_strategy["norm"].clip_rate == 0.0
    assert by_strategy["norm"].never_clipped
    assert 0 < by_strategy["percentile"].clip_rate <= 1
    assert not by_strategy["percentile"].never_clipped
    text = str(summary)
    assert "| clip rate |" in text.splitlines()[0]
    assert "0% (never clipped)" in text
    assert "never clipped, so the same as no clipping: norm" in text
    assert summary.never_clipped == [f"norm ({by_strategy['norm'].label})"]


def test_reporter_names_the_optimizer_it_needs():
    trial = optuna.create_study().ask()
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with pytest.raises(TypeError, match=r"optimizer must be a clipopt.ClippedOptimizer"):
        ct.TrialReporter(trial, sgd)
    with pytest.raises(TypeError, match=r"or clipopt\.Attachment or None"):
        ct.TrialReporter(trial, sgd)


def _reported(front_end):
    """Train 12 steps through ``front_end`` with a TrialReporter; its attributes."""
    study = optuna.create_study()
    trial = study.ask()
    torch.manual_seed(0)  # the same model for both front-ends (the guard reseeds per test)
    model = torch.nn.Linear(4, 1)
    make = (
        (lambda sgd: clipopt.ClippedOptimizer(sgd, "norm", max_norm=0.5))
        if front_end == "wrapper"
        else (lambda sgd: clipopt.attach(sgd, "norm", max_norm=0.5))
    )
    sgd = torch.optim.SGD(model.parameters(), lr=0.05)
    clipping = make(sgd)
    opt = clipping if front_end == "wrapper" else sgd
    reporter = ct.TrialReporter(trial, clipping, total_steps=11)
    g = torch.Generator().manual_seed(0)
    norms = []  # the pre-clip total norms, measured here by hand
    for step in range(12):
        x = torch.randn(8, 4, generator=g) * (1 + step % 3)
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        norms.append(float(torch.stack([p.grad.norm() for p in model.parameters()]).norm()))
        opt.step()
        reporter.report(loss.item(), step)
    reporter.finish(loss.item())
    return trial.user_attrs, norms


def test_reporter_records_the_same_statistics_from_an_attachment():
    """attach() users (Hugging Face, DCP) get the same clip rate and norm percentiles."""
    (wrapped, norms), (attached, _) = _reported("wrapper"), _reported("attach")
    assert wrapped["clipopt:steps"] == attached["clipopt:steps"] == 12.0
    assert 0 < wrapped["clipopt:clip_rate"] <= 1
    for q in (50, 90, 99):
        assert wrapped[f"clipopt:grad_norm_p{q}"] == pytest.approx(np.percentile(norms, q))
    assert wrapped == attached
