"""How tune() calls objectives: both signatures, and evaluated configurations reused."""

import functools
import inspect

import optuna
import pytest
from optuna.trial import TrialState

import clipopt.tuning as ct
from tests.test_tuning import tiny_objective

STRATEGIES = ("none", "norm")


@pytest.fixture(autouse=True)
def quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def tune(objective, **kwargs):
    kwargs = {"n_trials": 4, "strategies": STRATEGIES, "show_progress_bar": False, **kwargs}
    return ct.tune(objective, seed=0, worker_id=0, **kwargs)


def test_an_optuna_objective_of_the_trial_alone_works():
    def objective(trial):  # written for Optuna: suggests the strategy itself
        strategy = ct.suggest_strategy(trial, STRATEGIES)
        trial.suggest_float("lr", 1e-3, 1e-1, log=True)  # and its own parameters
        return tiny_objective(trial, strategy)

    study = tune(objective, n_trials=5)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 5
    assert all("lr" in t.params for t in study.trials)
    norm = [t for t in study.trials if t.params["clip_strategy"] == "norm"]
    assert norm
    assert all("clip_norm_max_norm" in t.params for t in norm)


class CallableObjective:
    def __call__(self, trial, strategy):
        return 1.0


@pytest.mark.parametrize(
    ("objective", "gets_strategy"),
    [
        (lambda trial, strategy: 1.0, True),
        (lambda trial, strategy=None: 1.0, True),
        (lambda *args: 1.0, True),
        (CallableObjective(), True),
        (functools.partial(lambda scale, trial, strategy: scale, 1.0), True),
        (lambda trial: 1.0, False),
        (lambda trial, *, scale=1.0: scale, False),
        (functools.partial(lambda trial, strategy: 1.0, strategy=None), False),
    ],
)
def test_the_signature_decides_what_the_objective_gets(objective, gets_strategy):
    seen = []

    def spy(*args):
        seen.append(len(args))
        return objective(*args)

    spy.__signature__ = inspect.signature(objective)
    tune(spy, n_trials=1)
    assert seen == [2 if gets_strategy else 1]


@pytest.mark.parametrize(
    "objective",
    [
        lambda: 1.0,
        lambda trial, strategy, extra: 1.0,
        lambda trial, *, extra: 1.0,
        lambda **kwargs: 1.0,
        "objective",
    ],
)
def test_other_objectives_are_a_clear_type_error(objective):
    with pytest.raises(TypeError, match=r"objective must .*\(trial, strategy\)"):
        tune(objective, n_trials=1)


def counting(calls):
    def objective(trial, strategy):
        calls.append(dict(trial.params))
        return tiny_objective(trial, strategy)

    return objective


def test_an_evaluated_configuration_is_not_trained_again():
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name="s")
    for _ in range(3):  # "none" three times over, as TPE suggests it again and again
        study.enqueue_trial({"clip_strategy": "none"})
    calls = []
    study = tune(counting(calls), storage=storage, study_name="s")
    nones = [t for t in study.trials if t.params["clip_strategy"] == "none"]
    assert len(nones) == 3  # the baseline "none" was queued already: not again
    assert [c["clip_strategy"] for c in calls].count("none") == 1  # trained once
    first, *again = nones
    assert "clipopt:duplicate_of" not in first.user_attrs
    for trial in again:
        assert trial.state == TrialState.COMPLETE
        assert trial.value == first.value
        assert trial.user_attrs["clipopt:duplicate_of"] == first.number
        assert (
            trial.user_attrs["clipopt:clip_rate"] == first.user_attrs["clipopt:clip_rate"]
        )
        assert trial.user_attrs["clipopt:worker"] == "0"  # its own, not copied


def test_another_workers_finished_trial_is_reused(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    first_calls, second_calls = [], []
    ct.tune(
        counting(first_calls),
        n_trials=2,
        storage=url,
        study_name="s",
        strategies=STRATEGIES,
        worker_id="a",
        show_progress_bar=False,
    )
    optuna.load_study(study_name="s", storage=url).enqueue_trial(
        {"clip_strategy": "norm", "clip_norm_max_norm": 1.0}  # evaluated by worker a
    )
    study = ct.tune(
        counting(second_calls),
        n_trials=3,
        storage=url,
        study_name="s",
        strategies=STRATEGIES,
        worker_id="b",
        show_progress_bar=False,
    )
    assert len(first_calls) == 2
    assert second_calls == []
    last = study.trials[-1]
    assert last.user_attrs["clipopt:duplicate_of"] == 1
    assert last.user_attrs["clipopt:worker"] == "b"


def test_pruned_trials_and_skip_evaluated_false_train_again():
    calls = []
    study = tune(counting(calls), n_trials=3, strategies=("none",), skip_evaluated=False)
    assert len(calls) == 3
    assert not any("clipopt:duplicate_of" in t.user_attrs for t in study.trials)

    def pruned_first(trial, strategy):
        calls.append(trial.number)
        if trial.number == 0:
            raise optuna.TrialPruned()
        return 1.0

    calls.clear()
    study = tune(pruned_first, n_trials=3, strategies=("none",))
    assert calls == [0, 1]  # trial 2 reuses trial 1, the first COMPLETE one
    assert study.trials[2].user_attrs["clipopt:duplicate_of"] == 1
