"""Storages shared by worker processes: SQLite and journal files on one machine."""

import multiprocessing
import time

import optuna
import pytest
from optuna.trial import TrialState

import clipopt.tuning as ct
from tests import tuning_worker


@pytest.fixture(autouse=True)
def quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def run_workers(target, n, args_of, errors, timeout=300):
    """Start n spawned workers meeting at one barrier; return the errors they reported."""
    barrier = multiprocessing.get_context("spawn").Barrier(n)
    workers = [
        tuning_worker.spawn(target, *args_of(i), barrier, str(errors)) for i in range(n)
    ]
    deadline = time.monotonic() + timeout
    for worker in workers:
        worker.join(max(deadline - time.monotonic(), 0))
    alive = [w.pid for w in workers if w.is_alive()]
    for worker in workers:
        if worker.is_alive():
            worker.kill()
    reported = sorted(p.read_text() for p in errors.glob("*.txt"))
    assert not alive, f"workers {alive} did not finish in {timeout} s; {reported}"
    codes = [w.exitcode for w in workers]
    assert codes == [0] * n, (codes, reported)
    return reported


@pytest.mark.slow
def test_workers_starting_together_on_a_fresh_sqlite_file_never_crash(tmp_path):
    # Six workers open the same fresh file at the same instant, ten times over. Before
    # the fix about one start in four (two workers) raised "table studies already exists".
    urls = [f"sqlite:///{tmp_path / f'fresh{r}.db'}" for r in range(10)]
    errors = run_workers(
        tuning_worker.open_storages, 6, lambda i: (urls,), tmp_path / "errors"
    )
    assert errors == [], "\n".join(errors)
    for url in urls:
        assert len(optuna.get_all_study_summaries(url)) == 1


@pytest.mark.slow
def test_two_worker_processes_share_one_sqlite_study(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    optuna.create_study(storage=ct.make_storage(url), study_name="shared")
    errors = run_workers(
        tuning_worker.tune_worker,
        2,
        lambda i: (url, 10, i, {"strategies": ("none", "norm")}),
        tmp_path / "errors",
    )
    assert errors == []
    study = optuna.load_study(study_name="shared", storage=url)
    finished = ct.count_finished(study)
    assert finished == 10  # the global budget, exactly
    by_worker = {}
    for t in study.trials:
        if "clipopt:worker" in t.user_attrs:
            by_worker.setdefault(t.user_attrs["clipopt:worker"], set()).add(
                t.user_attrs["clipopt:sampler_seed"]
            )
    assert len(by_worker) == 2, by_worker  # both workers ran trials...
    seeds = [s for v in by_worker.values() for s in v]
    assert len(seeds) == len(set(seeds)) == 2  # ...with different sampler seeds
    baselines = [t for t in study.trials if "clipopt:baseline" in t.user_attrs]
    assert len(baselines) == 2  # none and max_norm=1.0, enqueued once


def kill_one_worker_mid_trial(spec, tmp_path, workers=2, budget=8):
    """Run workers with a heartbeat, SIGKILL one in mid-trial; return the loaded study."""
    ctx = multiprocessing.get_context("spawn")
    started, barrier = ctx.Event(), ctx.Barrier(workers)
    errors = tmp_path / "errors"
    procs = [
        tuning_worker.spawn(
            tuning_worker.heartbeat_worker,
            spec,
            budget,
            i,
            i == 0,
            started,
            barrier,
            str(errors),
        )
        for i in range(workers)
    ]
    victim, survivors = procs[0], procs[1:]
    try:
        assert started.wait(tuning_worker.TIMEOUT), "the victim never started a trial"
        victim.kill()  # SIGKILL: no cleanup, its trial stays RUNNING in the storage
        victim.join(30)
        deadline = time.monotonic() + 300
        for proc in survivors:
            proc.join(max(deadline - time.monotonic(), 0))
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
    reported = sorted(p.read_text() for p in errors.glob("*.txt"))
    assert victim.exitcode == -9
    assert [p.exitcode for p in survivors] == [0] * len(survivors), reported
    assert reported == []
    return optuna.load_study(study_name="shared", storage=ct.make_storage(spec))


def check_killed_trial_was_retried(study, budget=8):
    states = [t.state for t in study.trials]
    assert TrialState.RUNNING not in states
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    killed = [t for t in failed if "clipopt:surplus" not in t.user_attrs]
    assert len(killed) == 1, failed
    killed = killed[0]
    assert killed.intermediate_values == {0: 1.0}  # it was mid-trial
    retries = [
        t for t in study.trials if t.system_attrs.get("failed_trial") == killed.number
    ]
    assert len(retries) == 1
    retry = retries[0]
    assert retry.params == killed.params
    assert retry.state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retry.user_attrs["clipopt:worker"] != killed.user_attrs["clipopt:worker"]
    assert ct.count_finished(study) == budget  # the budget, exactly: the retry counts
    done = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) == budget


@pytest.mark.slow
def test_a_killed_worker_trial_is_retried_on_a_journal_file(tmp_path):
    study = kill_one_worker_mid_trial(str(tmp_path / "study.log"), tmp_path)
    check_killed_trial_was_retried(study)


@pytest.mark.slow
def test_a_killed_worker_trial_is_retried_on_sqlite(tmp_path):
    study = kill_one_worker_mid_trial(f"sqlite:///{tmp_path / 'study.db'}", tmp_path)
    check_killed_trial_was_retried(study)


def test_make_storage_heartbeat_settings(tmp_path):
    from clipopt.tuning._optuna_private import heartbeat_interval

    journal = ct.make_storage(str(tmp_path / "a.log"), heartbeat_interval=5)
    study = optuna.create_study(storage=journal)
    assert heartbeat_interval(study) == 5
    assert journal.grace_period == 10
    plain = ct.make_storage(str(tmp_path / "b.log"), heartbeat_interval=None)
    assert heartbeat_interval(optuna.create_study(storage=plain)) is None
    sqlite = ct.make_storage(str(tmp_path / "a.db"))
    assert heartbeat_interval(optuna.create_study(storage=sqlite)) == 60
    with pytest.raises(ValueError, match="grace_period must be longer than heartbeat"):
        ct.make_storage(str(tmp_path / "c.db"), heartbeat_interval=5, grace_period=5)
    with pytest.raises(ValueError, match="heartbeat_interval must be >= 1"):
        ct.make_storage(str(tmp_path / "c.db"), heartbeat_interval=0)
