"""A tuning worker for tests/test_tuning.py: python tuning_worker.py DB BUDGET ID DIR.

Workers write DIR/ready.ID and wait for each other before tuning: the tiny study takes
less time than importing torch, so without it the first worker could finish the whole
budget alone and the test could not see two workers share the study.
"""

import pathlib
import sys
import time

import optuna

import clipopt.tuning as ct
from tests.test_tuning import tiny_objective

WORKERS = 2

if __name__ == "__main__":
    storage, budget, worker, folder = (
        sys.argv[1],
        int(sys.argv[2]),
        sys.argv[3],
        sys.argv[4],
    )
    ready = pathlib.Path(folder)
    (ready / f"ready.{worker}").touch()
    deadline = time.monotonic() + 120
    while len(list(ready.glob("ready.*"))) < WORKERS:
        if time.monotonic() > deadline:
            raise SystemExit("the other worker never started")
        time.sleep(0.05)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ct.tune(
        tiny_objective,
        n_trials=budget,
        storage=storage,
        study_name="shared",
        seed=0,
        strategies=("none", "norm"),
        show_progress_bar=False,
    )
    print(f"worker {worker} done")
