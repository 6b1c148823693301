"""The global trial budget of a study shared by workers: exact, and kept when one dies.

Which trials count: COMPLETE, PRUNED and FAIL ones, less two kinds of FAIL trial that
stand for nothing trained: a trial failed as stale (its worker died) and retried, whose
retry counts instead, and a *surplus* trial, one that a worker started after the other
workers had claimed the whole budget. A trial claims its place when it starts: it runs
only if fewer than ``n_trials`` counted or running trials were created before it (trial
numbers are given out by the storage, one at a time, so the order is the same for every
worker). That makes the budget exact however many workers ask at the same moment.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from ._optuna_private import fail_stale_trials, heartbeat_interval, retried_numbers

#: Trial user attribute marking a trial started after the budget was spent.
SURPLUS_ATTR = "clipopt:surplus"
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class BudgetSpent(Exception):  # noqa: N818  (an outcome, not a bug)
    """A trial started after the other workers had claimed the whole budget."""


def excluded_numbers(trials: Sequence[FrozenTrial]) -> set[int]:
    """Numbers of the trials that do not count: retried failures and surplus trials."""
    surplus = {t.number for t in trials if SURPLUS_ATTR in t.user_attrs}
    return surplus | retried_numbers(trials)


def _count(trials: Sequence[FrozenTrial], states: Sequence[TrialState]) -> int:
    excluded = excluded_numbers(trials)
    return sum(1 for t in trials if t.state in states and t.number not in excluded)


def count_finished(study: optuna.Study) -> int:
    """Return how many finished trials count toward the budget.

    Complete, pruned and failed trials count, except failed trials that were retried
    (their retry counts) and surplus trials (started after the budget was spent).
    """
    return _count(study.get_trials(deepcopy=False), _FINISHED)


def count_claimed(study: optuna.Study) -> int:
    """Return the finished trials that count, plus the running ones."""
    return _count(study.get_trials(deepcopy=False), (*_FINISHED, TrialState.RUNNING))


def claim(trial: optuna.Trial, n_trials: int) -> None:
    """Let ``trial`` run if it is within the budget; else mark it surplus and stop.

    Raises:
        BudgetSpent: ``n_trials`` counted or running trials were created before it.
    """
    trials = trial.study.get_trials(deepcopy=False)
    excluded = excluded_numbers(trials)
    ahead = sum(
        1
        for t in trials
        if t.number < trial.number
        and t.number not in excluded
        and t.state in (*_FINISHED, TrialState.RUNNING)
    )
    if ahead >= n_trials:
        trial.set_user_attr(SURPLUS_ATTR, True)
        trial.study.stop()
        raise BudgetSpent(
            f"the budget of {n_trials} trials was claimed by other workers; "
            f"surplus trial {trial.number} stops this worker"
        )


def stop_when_claimed(n_trials: int) -> Callable[[optuna.Study, FrozenTrial], None]:
    """Return a study callback that stops the worker once the budget is claimed."""

    def callback(study: optuna.Study, _trial: FrozenTrial) -> None:
        if count_claimed(study) >= n_trials:
            study.stop()

    return callback


def settle(
    study: optuna.Study,
    n_trials: int,
    run_more: Callable[[int], None],
    deadline: float | None,
) -> None:
    """Stay until the budget is finished, retrying the trials of dead workers.

    Only with a heartbeat (else a dead worker's trial would be waited for forever):
    while other workers' trials hold the rest of the budget, wait one heartbeat interval
    at a time and fail the stale ones, whose retries (or fresh trials, once retries are
    exhausted) then run here through ``run_more(n)``.
    """
    interval = heartbeat_interval(study)
    if interval is None:
        return
    while deadline is None or time.monotonic() < deadline:
        finished = count_finished(study)
        if finished >= n_trials:
            return
        free = n_trials - count_claimed(study)
        if free > 0:
            run_more(free)
            continue
        time.sleep(interval)
        fail_stale_trials(study)
