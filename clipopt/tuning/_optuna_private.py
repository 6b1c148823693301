"""Every touchpoint of clipopt.tuning with private Optuna APIs and Optuna internals.

Checked against optuna 5.1.0 (the 5.x release installed with ``clipopt[optuna]``).
``tests/test_tuning_private.py`` checks each assumption made here and fails with a
message naming it when an Optuna release changes it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import optuna


class SQLiteStorage(optuna.storages.RDBStorage):
    """RDBStorage on SQLite whose transactions take the write lock when they begin.

    SQLite ignores ``SELECT ... FOR UPDATE`` and pysqlite opens a transaction only at the
    first write, so two processes can both read a trial as WAITING and both run it
    (seen here with enqueued baselines: "Cannot tell a COMPLETE trial"). ``BEGIN
    IMMEDIATE``, the recipe of SQLAlchemy's pysqlite documentation, serialises them.

    Opening a fresh file creates the tables, the version row and alembic's stamp in
    separate statements, which two processes starting together would both run ("table
    studies already exists"): a lock file beside the database (``<file>.lock``, left in
    place) serialises the opening across processes.
    """

    def __init__(self, url: str, **kwargs: Any) -> None:
        with _creation_lock(url):
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
def _creation_lock(url: str) -> Iterator[None]:
    """Hold an inter-process lock on ``<database file>.lock`` (no-op in memory)."""
    from filelock import FileLock
    from sqlalchemy.engine import make_url

    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        yield
        return
    with FileLock(f"{database}.lock", timeout=120):
        yield
