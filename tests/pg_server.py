"""A throw-away PostgreSQL server for tests, from the distribution's server binaries.

``postgres_url`` (a session-scoped fixture) finds ``initdb`` and ``pg_ctl`` of Debian's
``postgresql`` package (``/usr/lib/postgresql/<version>/bin``, or on ``PATH``), creates
a cluster in a temporary folder, starts it on a free local port with a Unix socket in
that folder, creates a database and yields its URL; it stops the server and removes the
folder at the end. PostgreSQL refuses to run as root, so as root the cluster belongs to
the ``postgres`` user the package creates (``runuser -u postgres``).

Without the binaries the tests fail under CI (``CI=true``) and are skipped elsewhere,
each time with the command that installs them.
"""

from __future__ import annotations

import glob
import os
import pathlib
import shutil
import socket
import subprocess
import tempfile

import pytest

INSTALL = "apt-get update && apt-get install -y --no-install-recommends postgresql"


def server_binaries() -> pathlib.Path | None:
    """The folder holding initdb and pg_ctl (the newest version), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=_version)
    if found:
        return pathlib.Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")
    return pathlib.Path(on_path).parent if on_path else None


def _version(path: str) -> tuple[int, ...]:
    version = pathlib.Path(path).parent.parent.name
    return tuple(int(p) for p in version.split(".") if p.isdigit())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _missing(reason: str) -> None:
    message = f"{reason}; install the PostgreSQL server with: {INSTALL}"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres_url():
    bindir = server_binaries()
    if bindir is None:
        _missing("no PostgreSQL server binaries (initdb, pg_ctl) found")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _missing("the PostgreSQL driver psycopg is missing (pip install -e '.[dev]')")
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb and postgres refuse root
        as_user = ["runuser", "-u", "postgres", "--"]
    folder = pathlib.Path(tempfile.mkdtemp(prefix="clipopt-pg-"))
    data, log = folder / "data", folder / "server.log"
    if as_user:
        shutil.chown(folder, "postgres")
    port = _free_port()

    def run(*args: str) -> None:
        out = subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            log_text = log.read_text() if log.exists() else ""
            raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr}\n{log_text}")

    run(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "clipopt")
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
    run(
        str(bindir / "pg_ctl"),
        "-D",
        str(data),
        "-l",
        str(log),
        "-o",
        options,
        "-w",
        "start",
    )
    try:
        run(
            str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "clipopt",
            "optuna",
        )  # fmt: skip
        yield f"postgresql://clipopt@127.0.0.1:{port}/optuna"
    finally:
        run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def postgres_db(postgres_url, request):
    """A fresh database on the session's server, for one test: its URL."""
    import psycopg

    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name)[:50]
    connection = psycopg.connect(postgres_url, autocommit=True)
    with connection.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    connection.close()
    return postgres_url.rsplit("/", 1)[0] + f"/{name}"
