"""A tuning worker for tests/test_tuning.py: python tuning_worker.py DB BUDGET ID."""

import sys

import optuna

import clipopt.tuning as ct
from tests.test_tuning import tiny_objective

if __name__ == "__main__":
    storage, budget, worker = sys.argv[1], int(sys.argv[2]), sys.argv[3]
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
