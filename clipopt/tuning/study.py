"""Run a study: storages, seeds, baselines, the global budget, and :func:`tune`."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import optuna

from .._protocol import ClipStrategy
from .._validation import check_choice, check_int
from ._budget import (
    BudgetSpent,
    claim,
    count_claimed,
    count_finished,
    settle,
    stop_when_claimed,
)
from ._objective import evaluated_before, objective_caller, reuse
from ._optuna_private import (
    JournalHeartbeatStorage,
    SQLiteStorage,
    creation_lock,
    retry_callback,
)
from .reporting import Diverged, NonfiniteObjective, _handle_nonfinite
from .space import NONE, Space, _check_strategies, param_name, suggest_strategy

_BASELINES_ATTR = "clipopt:baselines_enqueued"
_BASELINE_TAG = "clipopt:baseline"

#: The baselines :func:`enqueue_baselines` adds, when their strategy is searched.
_BASELINES: dict[str, tuple[str, dict[str, float]]] = {
    "no clipping": (NONE, {}),
    "max_norm=1.0": ("norm", {"max_norm": 1.0}),
    "percentile=10": ("percentile", {"percentile": 10.0}),
}

#: ``objective(trial, strategy) -> value``, or an Optuna objective ``objective(trial)``.
Objective = Callable[[optuna.Trial, ClipStrategy], float] | Callable[[optuna.Trial], float]


def make_storage(
    spec: str | optuna.storages.BaseStorage | None,
    *,
    heartbeat_interval: int | None = 60,
    grace_period: int | None = None,
    max_retry: int | None = 3,
) -> Any:
    """Return an Optuna storage for a URL, a file path, or an existing storage.

    - None: in memory (one process).
    - ``"sqlite:///study.db"`` or a path ending in ``.db``: embedded SQLite, with a
      generous lock timeout, transactions that lock when they begin (so two processes
      never run the same enqueued trial) and an inter-process lock while a fresh file
      is created; fine for a few processes on one machine.
    - A path ending in ``.log`` or ``.jsonl``: a journal file, for many processes on one
      machine (or on a shared file system).
    - ``"postgresql://..."`` (``pip install "clipopt[postgres]"``),
      ``"mysql+pymysql://..."``: a database server, for many machines.
    - An ``optuna.storages`` object: used as is.

    Storages made from a string get a heartbeat: each running trial records that it is
    alive every ``heartbeat_interval`` seconds, and a trial silent for ``grace_period``
    seconds (its worker was killed) is failed and enqueued again, up to ``max_retry``
    times, by the next worker that starts a trial (Optuna's heartbeat on databases,
    clipopt's on journal files, in a trial system attribute). :func:`tune` then keeps the
    budget: the failed trial does not count, its retry does.

    Args:
        spec: What to open (above).
        heartbeat_interval: Seconds between heartbeats, a positive int; None: no
            heartbeat.
        grace_period: Seconds of silence before a running trial is failed (default
            ``2 * heartbeat_interval``).
        max_retry: How often one trial is retried (None: without limit).

    Raises:
        ValueError: A heartbeat setting is not a positive int, or ``grace_period`` is
            not longer than ``heartbeat_interval``.
    """
    if spec is None or not isinstance(spec, str):
        return spec
    heartbeat = _heartbeat_kwargs(heartbeat_interval, grace_period, max_retry)
    if spec.endswith((".log", ".jsonl")) and "://" not in spec:
        from optuna.storages.journal import JournalFileBackend

        backend = JournalFileBackend(spec)
        if not heartbeat:
            return optuna.storages.JournalStorage(backend)
        return JournalHeartbeatStorage(backend, **heartbeat)
    url = f"sqlite:///{spec}" if spec.endswith(".db") and "://" not in spec else spec
    with warnings.catch_warnings():  # the heartbeat arguments are experimental in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if url.startswith("sqlite"):
            return SQLiteStorage(
                url, engine_kwargs={"connect_args": {"timeout": 60}}, **heartbeat
            )
        with creation_lock(url):
            return optuna.storages.RDBStorage(url, **heartbeat)


def _lock(spec: str | optuna.storages.BaseStorage | None) -> Any:
    """The inter-process lock of a storage given as a string (else none)."""
    if not isinstance(spec, str):
        return contextlib.nullcontext()
    if spec.endswith(".db") and "://" not in spec:
        spec = f"sqlite:///{spec}"
    return creation_lock(spec)


def _heartbeat_kwargs(
    interval: int | None, grace_period: int | None, max_retry: int | None
) -> dict[str, Any]:
    if interval is None:
        return {}
    interval = check_int("heartbeat_interval", interval, minimum=1)
    if grace_period is not None:
        grace_period = check_int("grace_period", grace_period, minimum=1)
        if grace_period <= interval:
            raise ValueError(
                f"grace_period must be longer than heartbeat_interval ({interval} s), "
                f"got {grace_period}; pass e.g. grace_period={2 * interval}"
            )
    if max_retry is not None:
        max_retry = check_int("max_retry", max_retry, minimum=0)
    return {
        "heartbeat_interval": interval,
        "grace_period": grace_period,
        "heartbeat_stale_trial_callback": retry_callback(max_retry),
    }


def worker_seed(
    seed: int | None, *, worker_id: int | str | None = None, n_existing: int = 0
) -> int | None:
    """Derive a sampler seed distinct per worker and per resume.

    The same seed in two workers makes them suggest the same first configurations
    (optuna#4714), and resuming with the same seed repeats the startup configurations
    (optuna#3255). The seed is therefore hashed with the worker's identity (``worker_id``,
    or host and process id) and the number of trials the study already has.

    Returns:
        None if ``seed`` is None (fresh entropy everywhere), else a 32-bit seed.

    Example:
        >>> worker_seed(0, worker_id=1) != worker_seed(0, worker_id=2)
        True
        >>> worker_seed(0, worker_id=1) == worker_seed(0, worker_id=1)
        True
    """
    if seed is None:
        return None
    ident = worker_id if worker_id is not None else f"{socket.gethostname()}:{os.getpid()}"
    digest = hashlib.sha256(f"{seed}|{ident}|{n_existing}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def baseline_params(
    strategies: Sequence[str], prefix: str = "clip"
) -> dict[str, dict[str, Any]]:
    """Return the baseline trials' parameters that fit the searched strategies.

    The baselines are no clipping, ``max_norm=1.0`` and ``percentile=10`` (AutoClip's
    default), each included when its strategy is searched.
    """
    names = _check_strategies(strategies)
    baselines: dict[str, dict[str, Any]] = {}
    for label, (strategy, values) in _BASELINES.items():
        if strategy not in names:
            continue
        params: dict[str, Any] = {} if len(names) == 1 else {f"{prefix}_strategy": strategy}
        params.update({param_name(strategy, k, prefix): v for k, v in values.items()})
        baselines[label] = params
    return baselines


def enqueue_baselines(
    study: optuna.Study, strategies: Sequence[str], prefix: str = "clip"
) -> list[str]:
    """Enqueue the baseline trials once per study; return the labels enqueued now.

    A study attribute marks them as enqueued, so later workers and resumes skip them.
    Workers that call it at the same instant may both enqueue (``skip_if_exists`` then
    catches most duplicates): :func:`tune` calls it under the storage's inter-process
    lock when the storage is given as a string; otherwise call it from one process.
    """
    if study.user_attrs.get(_BASELINES_ATTR):
        return []
    study.set_user_attr(_BASELINES_ATTR, True)
    labels = []
    for label, params in baseline_params(strategies, prefix).items():
        study.enqueue_trial(params, user_attrs={_BASELINE_TAG: label}, skip_if_exists=True)
        labels.append(label)
    return labels


def tune(
    objective: Objective,
    *,
    n_trials: int,
    storage: str | optuna.storages.BaseStorage | None = None,
    study_name: str | None = None,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
    seed: int | None = None,
    strategies: Sequence[str] = (NONE, "norm", "percentile"),
    spaces: Mapping[str, Space] | None = None,
    prefix: str = "clip",
    direction: Literal["minimize", "maximize"] = "minimize",
    baselines: bool = True,
    on_nonfinite: NonfiniteObjective = "prune",
    penalty: float | None = None,
    timeout: float | None = None,
    worker_id: int | str | None = None,
    show_progress_bar: bool = True,
    catch: Iterable[type[Exception]] = (),
    skip_evaluated: bool = True,
) -> optuna.Study:
    """Tune the clipping strategy and threshold: run (or join, or resume) a study.

    ``objective(trial, strategy)`` trains with the suggested ``strategy`` (build a
    :class:`clipopt.ClippedOptimizer` from it) and returns the value to optimise; it may
    use :class:`TrialReporter` to report and prune. An Optuna objective
    ``objective(trial)`` works too: it calls ``suggest_strategy(trial, strategies)``
    itself, with the same ``strategies`` (``tune`` suggested them already, so the call
    returns the same strategy). The form is read from the signature.

    Run the same call in several processes or machines with the same ``storage`` and
    ``study_name`` to share the study: the budget ``n_trials`` is global (finished
    trials of every worker count, running ones too; a worker may overshoot by the number
    of workers minus one), the sampler seed is distinct per worker and per resume, and
    re-running resumes.

    A trial whose parameters equal those of a COMPLETE trial of the study (of any
    worker), such as ``"none"`` suggested again, is not trained: it returns that trial's
    value and statistics, with the user attribute ``clipopt:duplicate_of`` naming it.
    Turn this off with ``skip_evaluated=False`` for a noisy objective.

    A non-finite objective value never makes a FAIL trial (samplers would ignore it and
    never learn the region): it is pruned, or penalized with ``penalty``, or raised.

    Args:
        objective: ``(trial, strategy) -> value`` or ``(trial) -> value``.
        n_trials: Global budget of finished trials, >= 1.
        storage: None (in memory), a URL or path (see :func:`make_storage`) or a storage.
        study_name: Name of the study in the storage (required to share or resume one).
        sampler: Default: ``TPESampler(seed=worker_seed(seed, ...))``.
        pruner: Default: ``MedianPruner(n_startup_trials=5)``; use
            :class:`TrialReporter` ``total_steps`` for its warm-up share.
        seed: Base seed of the default sampler (None: fresh entropy).
        strategies: Searched strategies; ``"none"`` is no clipping.
        spaces: Search-space overrides (see :func:`suggest_strategy`).
        prefix: Prefix of the parameter names.
        direction: ``"minimize"`` or ``"maximize"``.
        baselines: Enqueue the baselines (no clipping, ``max_norm=1.0``,
            ``percentile=10``) that fit ``strategies``, once per study.
        on_nonfinite: For a non-finite objective value: ``"prune"``, ``"penalize"``,
            ``"raise"``.
        penalty: Value of a penalized trial (required with ``"penalize"``).
        timeout: Stop this worker after so many seconds.
        worker_id: This worker's identity for its seed (default: host and process id;
            pass one for a reproducible single-process study).
        show_progress_bar: Show Optuna's progress bar.
        catch: Exception types that fail a trial without stopping the study.
        skip_evaluated: Reuse the value of a COMPLETE trial with the same parameters
            instead of training again.

    Returns:
        The study.

    Raises:
        TypeError: ``objective`` takes neither ``(trial, strategy)`` nor ``(trial)``.
        ValueError: Invalid arguments.
    """
    call = objective_caller(objective)
    n_trials = check_int("n_trials", n_trials, minimum=1)
    names = _check_strategies(strategies)
    check_choice("direction", direction, ("minimize", "maximize"))
    check_choice("on_nonfinite", on_nonfinite, ("prune", "penalize", "raise"))
    if on_nonfinite == "penalize" and (penalty is None or not math.isfinite(penalty)):
        raise ValueError(f"on_nonfinite='penalize' needs a finite penalty, got {penalty!r}")
    study = optuna.create_study(
        storage=make_storage(storage),
        study_name=study_name,
        direction=direction,
        pruner=pruner
        if pruner is not None
        else optuna.pruners.MedianPruner(n_startup_trials=5),
        load_if_exists=True,
    )
    existing = count_finished(study)
    effective_seed = worker_seed(seed, worker_id=worker_id, n_existing=existing)
    study.sampler = (
        sampler if sampler is not None else optuna.samplers.TPESampler(seed=effective_seed)
    )
    if baselines:
        # under the storage's lock: workers starting together would each enqueue them
        with _lock(storage):
            enqueue_baselines(study, names, prefix)
    worker = (
        str(worker_id) if worker_id is not None else f"{socket.gethostname()}:{os.getpid()}"
    )

    def run(trial: optuna.Trial) -> float:
        claim(trial, n_trials)
        trial.set_user_attr("clipopt:worker", worker)
        if effective_seed is not None:
            trial.set_user_attr("clipopt:sampler_seed", effective_seed)
        strategy = suggest_strategy(trial, names, spaces=spaces, prefix=prefix)
        previous = evaluated_before(trial) if skip_evaluated else None
        if previous is not None:
            return reuse(trial, previous)
        try:
            value = float(call(trial, strategy))
            if not math.isfinite(value):
                _handle_nonfinite(trial, on_nonfinite, penalty, value, None)
        except Diverged as diverged:  # from the reporter, or from the line above
            trial.set_user_attr("clipopt:penalized", True)
            return diverged.penalty
        return value

    deadline = None if timeout is None else time.monotonic() + timeout

    def run_more(count: int) -> None:
        study.optimize(
            run,
            n_trials=count,
            timeout=None if deadline is None else max(deadline - time.monotonic(), 0),
            callbacks=[stop_when_claimed(n_trials)],
            catch=(*catch, BudgetSpent),
            gc_after_trial=True,
            show_progress_bar=show_progress_bar,
        )

    remaining = n_trials - count_claimed(study)
    if remaining > 0:
        run_more(remaining)
    settle(study, n_trials, run_more, deadline)
    return study
