"""Worker processes for the tuning tests, started with multiprocessing's spawn context.

Each function runs in a fresh interpreter (spawn: no state inherited from pytest) and
reports failures through a queue, so that a test can show a worker's traceback. The
workers meet at a ``multiprocessing.Barrier`` before the part that must overlap (opening
a fresh database, tuning), because importing torch takes longer than a tiny study.
"""

from __future__ import annotations

import multiprocessing
import os
import pathlib
import traceback
from collections.abc import Callable
from typing import Any

TIMEOUT = 120.0  # seconds a barrier waits for the other workers


def spawn(target: Callable[..., None], *args: Any) -> multiprocessing.Process:
    """Start ``target(*args)`` in a spawned process with one torch thread."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    process = multiprocessing.get_context("spawn").Process(target=target, args=args)
    process.start()
    return process


def _report(errors: str, where: str) -> None:
    folder = pathlib.Path(errors)
    folder.mkdir(parents=True, exist_ok=True)
    n = len(list(folder.iterdir()))
    (folder / f"{os.getpid()}-{n}.txt").write_text(f"{where}: {traceback.format_exc()}")


def _quiet() -> None:
    import optuna
    import torch

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def open_storages(urls: list[str], barrier: Any, errors: str) -> None:
    """For each URL: wait for every worker, then open the storage and join one study."""
    _quiet()
    import optuna

    import clipopt.tuning as ct

    for url in urls:
        barrier.wait(TIMEOUT)
        try:
            storage = ct.make_storage(url)
            optuna.create_study(storage=storage, study_name="s", load_if_exists=True)
        except Exception:
            _report(errors, url)


def tune_worker(
    storage: str, budget: int, worker: int, kwargs: Any, barrier: Any, errors: str
) -> None:
    """Wait for every worker, then run ``ct.tune`` on the shared study."""
    _quiet()
    import clipopt.tuning as ct
    from tests.test_tuning import tiny_objective

    try:
        barrier.wait(TIMEOUT)
        ct.tune(
            tiny_objective,
            n_trials=budget,
            storage=storage,
            study_name="shared",
            seed=0,
            worker_id=f"w{worker}",
            show_progress_bar=False,
            **kwargs,
        )
    except Exception:
        _report(errors, f"worker {worker}")


def heartbeat_worker(
    spec: str,
    budget: int,
    worker: int,
    victim: bool,
    started: Any,
    barrier: Any,
    errors: str,
) -> None:
    """Tune with a 1 s heartbeat; the victim blocks in its first trial until killed.

    The other workers wait for ``started`` before training, so the victim is known to be
    in the middle of a trial (it reported a value) when the test kills it.
    """
    _quiet()
    import threading

    import clipopt.tuning as ct
    from tests.test_tuning import tiny_objective

    def objective(trial: Any, strategy: Any) -> float:
        if victim:
            trial.report(1.0, 0)
            # Optuna's heartbeat thread may not have written yet on a loaded machine,
            # and a trial without any heartbeat is never stale: the survivors would
            # wait for it until their deadline. Write one before being killed.
            storage.record_heartbeat(trial._trial_id)
            started.set()
            threading.Event().wait()  # until SIGKILL
        if not started.wait(TIMEOUT):
            raise RuntimeError("the victim never started a trial")
        return float(tiny_objective(trial, strategy))

    try:
        storage = ct.make_storage(spec, heartbeat_interval=1, grace_period=2)
        barrier.wait(TIMEOUT)
        ct.tune(
            objective,
            n_trials=budget,
            storage=storage,
            study_name="shared",
            seed=0,
            worker_id=f"w{worker}",
            strategies=("none", "norm"),
            show_progress_bar=False,
        )
    except Exception:
        _report(errors, f"worker {worker}")
