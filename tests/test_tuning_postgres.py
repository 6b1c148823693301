"""Tuning on a real PostgreSQL server: many workers, and a worker killed in mid-trial.

The server is a throw-away cluster from Debian's postgresql package (tests/pg_server.py);
CI installs the package (.ci/run). Locally: apt-get install postgresql, then
python -m pytest tests/test_tuning_postgres.py.
"""

import optuna
import pytest
from optuna.trial import TrialState

import clipopt.tuning as ct
from tests import tuning_worker
from tests.pg_server import postgres_db, postgres_url  # noqa: F401  (fixtures)
from tests.test_tuning_storage import (
    check_killed_trial_was_retried,
    kill_one_worker_mid_trial,
    run_workers,
)

pytestmark = pytest.mark.slow


def test_four_workers_share_a_postgresql_study(postgres_db, tmp_path):  # noqa: F811
    budget = 12
    errors = run_workers(
        tuning_worker.tune_worker,
        4,
        lambda i: (postgres_db, budget, i, {"strategies": ("none", "norm", "percentile")}),
        tmp_path / "errors",
    )
    assert errors == [], "\n".join(errors)
    study = optuna.load_study(study_name="shared", storage=postgres_db)
    assert ct.count_finished(study) == budget  # the global budget, exactly
    done = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) == budget
    others = [t for t in study.trials if t not in done]
    assert all(t.user_attrs.get("clipopt:surplus") for t in others), others
    baselines = [t for t in study.trials if "clipopt:baseline" in t.user_attrs]
    assert sorted(t.user_attrs["clipopt:baseline"] for t in baselines) == [
        "max_norm=1.0",
        "no clipping",
        "percentile=10",
    ]  # enqueued once, run once
    seeds = {}
    for trial in done:
        seeds.setdefault(trial.user_attrs["clipopt:worker"], set()).add(
            trial.user_attrs["clipopt:sampler_seed"]
        )
    assert all(len(s) == 1 for s in seeds.values()), seeds  # one seed per worker...
    assert len({s for v in seeds.values() for s in v}) == len(seeds)  # ...all distinct
    assert len(seeds) >= 2, seeds


def test_a_killed_worker_trial_is_retried_on_postgresql(postgres_db, tmp_path):  # noqa: F811
    study = kill_one_worker_mid_trial(postgres_db, tmp_path, workers=3)
    check_killed_trial_was_retried(study)
