"""The private Optuna APIs that clipopt/tuning/_optuna_private.py relies on.

Each test names the assumption it checks, so that an Optuna release that changes one
fails here with a message saying what to update, rather than somewhere in a study.
"""

import pickle
import time

import optuna
import pytest
import sqlalchemy

import clipopt.tuning as ct
from clipopt.tuning import _optuna_private as private


def require(condition, assumption):
    if not condition:
        pytest.fail(
            f"optuna {optuna.__version__} changed a private API that "
            f"clipopt/tuning/_optuna_private.py relies on: {assumption}. Update that "
            "module (and the version it names) for this Optuna release.",
            pytrace=False,
        )


def statements_of(storage):
    seen = []
    sqlalchemy.event.listen(
        storage.engine,
        "before_cursor_execute",
        lambda conn, cursor, statement, *args: seen.append(statement),
    )
    return seen


def test_rdb_storage_exposes_its_sqlalchemy_engine(tmp_path):
    storage = private.SQLiteStorage(f"sqlite:///{tmp_path / 'a.db'}")
    require(
        isinstance(getattr(storage, "engine", None), sqlalchemy.engine.Engine),
        "RDBStorage.engine is the SQLAlchemy Engine that every transaction uses",
    )


@pytest.mark.parametrize("pickled", [False, True])
def test_sqlite_transactions_begin_immediately(tmp_path, pickled):
    storage = private.SQLiteStorage(f"sqlite:///{tmp_path / 'a.db'}")
    if pickled:  # RDBStorage.__setstate__ rebuilds the engine: the hooks must follow
        storage = pickle.loads(pickle.dumps(storage))
    seen = statements_of(storage)
    storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], "s")
    require(
        "BEGIN IMMEDIATE" in seen,
        "RDBStorage runs its transactions through RDBStorage.engine (the 'begin' event "
        f"hook saw {seen[:3]})",
    )


def test_the_creation_lock_sits_beside_the_database(tmp_path):
    private.SQLiteStorage(f"sqlite:///{tmp_path / 'a.db'}")
    assert (tmp_path / "a.db.lock").exists()
    private.SQLiteStorage("sqlite:///:memory:")  # no file, no lock


def test_optimize_fails_and_retries_stale_trials_of_a_journal_heartbeat(tmp_path):
    # JournalHeartbeatStorage is an optuna.storages._heartbeat.BaseHeartbeat: Optuna's
    # optimize() must fail its stale trials before the next trial, run the retry
    # callback, and the retry must carry "retry_history" in its system attributes.
    storage = ct.make_storage(str(tmp_path / "a.log"), heartbeat_interval=1)
    study = optuna.create_study(storage=storage)
    with pytest.warns(UserWarning, match="Heartbeat"):
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    storage.record_heartbeat(trial._trial_id)
    assert storage._get_stale_trial_ids(study._study_id) == []
    storage.set_trial_system_attr(trial._trial_id, private.HEARTBEAT_ATTR, time.time() - 3)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    first, retry = study.trials
    require(
        first.state == optuna.trial.TrialState.FAIL,
        "Study.optimize calls fail_stale_trials for any BaseHeartbeat storage with an "
        "interval (optuna.storages._heartbeat)",
    )
    require(
        retry.params == first.params and private.retried_numbers([retry]) == {0},
        "RetryHeartbeatStaleTrialCallback enqueues the same parameters and records "
        f"system_attrs['retry_history'] (got {retry.system_attrs})",
    )
