"""Every touchpoint of clipopt.tuning with private Optuna APIs and Optuna internals.

Checked against optuna 5.1.0 (the 5.x release installed with ``clipopt[optuna]``).
``tests/test_tuning_private.py`` checks each assumption made here and fails with a
message naming it when an Optuna release changes it.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import optuna
from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled
from optuna.trial import FrozenTrial, TrialState


class SQLiteStorage(optuna.storages.RDBStorage):
    """RDBStorage on SQLite whose transactions take the write lock when they begin.

    SQLite ignores ``SELECT ... FOR UPDATE`` and pysqlite opens a transaction only at the
    first write, so two processes can both read a trial as WAITING and both run it
    (seen here with enqueued baselines: "Cannot tell a COMPLETE trial"). ``BEGIN
    IMMEDIATE``, the recipe of SQLAlchemy's pysqlite documentation, serialises them.

    It opens under :func:`creation_lock`.
    """

    def __init__(self, url: str, **kwargs: Any) -> None:
        with creation_lock(url):
            super().__init__(url, **kwargs)
        self._begin_immediately()

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__(state)
        self._begin_immediately()

    def _begin_immediately(self) -> None:
        from sqlalchemy import event

        @event.listens_for(self.engine, "connect")
        def _connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None  # SQLAlchemy's BEGIN, below, rules

        @event.listens_for(self.engine, "begin")
        def _begin(connection: Any) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        self.engine.dispose()  # pooled connections predate the hooks


@contextlib.contextmanager
def creation_lock(url: str) -> Iterator[None]:
    """Serialise opening a storage across processes while it may create its tables.

    RDBStorage creates its tables, version row and alembic stamp in separate statements,
    which workers opening a fresh database together would all run ("table studies
    already exists" on SQLite, a duplicate ``studydirection`` type on PostgreSQL). SQLite
    takes a lock file beside the database (``<file>.lock``, left in place), PostgreSQL a
    session-level advisory lock; a journal file (a path, no ``://``) a lock file beside
    it; other URLs take none. :func:`clipopt.tuning.tune` also enqueues its baselines
    under it, so that workers starting together enqueue them once.
    """
    from filelock import FileLock
    from sqlalchemy.engine import make_url

    if "://" not in url:
        with FileLock(f"{url}.lock", timeout=120):
            yield
        return
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql":
        with _advisory_lock(url):
            yield
        return
    database = parsed.database
    if (
        parsed.get_backend_name() != "sqlite"
        or not database
        or database == ":memory:"
        or database.startswith("file:")
    ):
        yield
        return
    with FileLock(f"{database}.lock", timeout=120):
        yield


#: The key of clipopt's advisory lock on PostgreSQL (any fixed 64-bit integer).
_ADVISORY_KEY = 0x636C69706F7074  # "clipopt"


@contextlib.contextmanager
def _advisory_lock(url: str) -> Iterator[None]:
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    engine = sqlalchemy.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text(f"SELECT pg_advisory_lock({_ADVISORY_KEY})"))
            try:
                yield
            finally:
                connection.execute(
                    sqlalchemy.text(f"SELECT pg_advisory_unlock({_ADVISORY_KEY})")
                )
    finally:
        engine.dispose()


# -- heartbeat ----------------------------------------------------------------------------
# Optuna's heartbeat lives in optuna.storages._heartbeat: Study.optimize runs
# fail_stale_trials before each trial and a HeartbeatThread around it for any storage
# that is a BaseHeartbeat with an interval. RDBStorage is one; JournalStorage is not, so
# JournalHeartbeatStorage below adds it, keeping the beats in a trial system attribute.

#: Trial system attribute holding the wall-clock time (``time.time()``) of the last beat.
HEARTBEAT_ATTR = "clipopt:heartbeat"


class JournalHeartbeatStorage(optuna.storages.JournalStorage, BaseHeartbeat):
    """A journal storage with Optuna's heartbeat: stale RUNNING trials are failed.

    Each running trial's worker writes the time every ``heartbeat_interval`` seconds;
    before each trial, every worker fails the RUNNING trials whose last beat is older
    than ``grace_period`` and runs ``heartbeat_stale_trial_callback`` on them. The times
    are wall-clock times of the writing machines: on a shared file system, their clocks
    must agree to well within ``grace_period - heartbeat_interval``.
    """

    def __init__(
        self,
        backend: Any,
        *,
        heartbeat_interval: int,
        grace_period: int | None = None,
        heartbeat_stale_trial_callback: Callable[[optuna.Study, FrozenTrial], None]
        | None = None,
    ) -> None:
        super().__init__(backend)
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period or 2 * heartbeat_interval
        self.heartbeat_stale_trial_callback = heartbeat_stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        """Write the current time into the trial (ignored once the trial finished)."""
        # A trial failed as stale by another worker meanwhile has nothing left to beat.
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        running = self.get_all_trials(
            study_id, deepcopy=False, states=(TrialState.RUNNING,)
        )
        return [
            trial._trial_id
            for trial in running
            if HEARTBEAT_ATTR in trial.system_attrs
            and now - float(trial.system_attrs[HEARTBEAT_ATTR]) > self.grace_period
        ]

    def get_heartbeat_interval(self) -> int | None:
        """The heartbeat interval in seconds."""
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(
        self,
    ) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        """The callback run on each trial failed as stale."""
        return self.heartbeat_stale_trial_callback


def heartbeat_interval(study: optuna.Study) -> int | None:
    """The heartbeat interval of the study's storage, or None without a heartbeat."""
    storage = study._storage
    if not is_heartbeat_enabled(storage):
        return None
    assert isinstance(storage, BaseHeartbeat)
    return storage.get_heartbeat_interval()


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail the study's stale RUNNING trials now (and retry them, per the storage)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def retry_callback(max_retry: int | None) -> Callable[[optuna.Study, FrozenTrial], None]:
    """Optuna's retry of stale trials, without its ExperimentalWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)


def retried_numbers(trials: Iterable[FrozenTrial]) -> set[int]:
    """Numbers of the trials that RetryHeartbeatStaleTrialCallback re-enqueued.

    The callback copies ``system_attrs["retry_history"]`` (the numbers of the failed
    trials it retries, oldest first) into each retry.
    """
    numbers: set[int] = set()
    for trial in trials:
        numbers.update(int(n) for n in trial.system_attrs.get("retry_history", ()))
    return numbers
