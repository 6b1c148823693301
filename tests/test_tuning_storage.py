"""Storages shared by worker processes: SQLite and journal files on one machine."""

import multiprocessing
import time

import optuna
import pytest

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
    assert 10 <= finished <= 11  # global budget; may overshoot by workers - 1
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
