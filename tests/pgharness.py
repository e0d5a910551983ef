"""
A PostgreSQL server for the tests, found or started once per session.

In this order:

1. ``M2MGW_TEST_STORE_POSTGRES`` holds the postgres store's options as JSON
   (``{"dsn": "postgresql://..."}``): that server is used;
2. else a throwaway cluster is made with ``initdb`` and ``pg_ctl`` (found on
   ``PATH`` or under ``/usr/lib/postgresql/*/bin``) in a temporary directory,
   listening only on a unix socket there, and stopped at the end of the
   session.  ``initdb`` refuses to run as root: as root, the cluster runs as
   the ``postgres`` system user (``runuser``);
3. else (no binaries: ``tests/pg-setup``, which ``make test`` runs first,
   installs them where it can) the PostgreSQL tests are skipped with a loud
   reason -- or fail, with ``CI=true``.

Each test gets a schema of its own in that server's database (its DSN sets
``search_path``), migrated, and dropped after the test: faster than a
database per test, and it needs no right to create databases.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import json
import os
import random
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any

#: The environment variable of option 1.
OPTIONS_VARIABLE = "M2MGW_TEST_STORE_POSTGRES"


class Unavailable(Exception):
    """No PostgreSQL server could be found or started (the message says why)."""


def _find_binaries() -> str | None:
    """The directory holding ``initdb`` and ``pg_ctl``, or ``None``."""
    initdb = shutil.which("initdb")
    if initdb is not None and shutil.which("pg_ctl") is not None:
        return os.path.dirname(initdb)
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda path: int(path.split("/")[-2]) if path.split("/")[-2].isdigit() else 0,
    )
    for directory in reversed(candidates):
        if all(os.access(os.path.join(directory, b), os.X_OK) for b in ("initdb", "pg_ctl")):
            return directory
    return None


def _connect(dsn: str) -> Any:
    import psycopg

    return psycopg.connect(dsn, autocommit=True, connect_timeout=10)


@dataclass
class PostgresServer:
    """
    A server the tests may create databases in.

    :ivar admin_dsn: connects to a database from which others are created.
    :ivar origin: how it was found, for the test report.
    """

    admin_dsn: str
    origin: str
    _stop: list[list[str]] = field(default_factory=list)
    _cleanup: list[str] = field(default_factory=list)
    _counter: Any = field(default_factory=lambda: itertools.count(1))

    def dsn_for(self, schema: str) -> str:
        """A DSN of the server's database whose ``search_path`` is ``schema``."""
        import psycopg

        params = psycopg.conninfo.conninfo_to_dict(self.admin_dsn)
        params["options"] = f"{params.get('options') or ''} -csearch_path={schema}".strip()
        return str(psycopg.conninfo.make_conninfo(**params))

    def new_database(self, migrated: bool = True) -> str:
        """
        A new empty schema of its own (at the shipped schema level if
        ``migrated``), as the DSN that uses it.
        """
        from m2mgw.store.postgres import migrate, shipped_migrations

        name = f"m2mgw_test_{os.getpid()}_{next(self._counter)}"
        with _connect(self.admin_dsn) as admin:
            admin.execute(f"CREATE SCHEMA {name}")
        self._cleanup.append(name)
        dsn = self.dsn_for(name)
        if migrated:
            with _connect(dsn) as connection:
                migrate(connection, shipped_migrations())
        return dsn

    def drop_database(self, dsn: str) -> None:
        """Drop a schema :meth:`new_database` made."""
        import psycopg

        options = psycopg.conninfo.conninfo_to_dict(dsn).get("options") or ""
        name = options.rsplit("search_path=", 1)[-1]
        if name in self._cleanup:
            self._cleanup.remove(name)
            with _connect(self.admin_dsn) as admin:
                admin.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")

    def stop(self) -> None:
        """Drop what is left and stop the cluster if this session started it."""
        for name in list(self._cleanup):
            with contextlib.suppress(Exception):
                self.drop_database(self.dsn_for(name))
        for command in self._stop:
            subprocess.run(command, capture_output=True, check=False, timeout=60)


def _from_environment() -> PostgresServer | None:
    text = os.environ.get(OPTIONS_VARIABLE)
    if not text:
        return None
    options = json.loads(text)
    dsn = options.get("dsn") if isinstance(options, dict) else None
    if not dsn:
        raise Unavailable(f"{OPTIONS_VARIABLE} has no dsn")
    try:
        _connect(dsn).close()
    except Exception as exc:
        raise Unavailable(f"{OPTIONS_VARIABLE}: cannot connect: {exc}") from None
    return PostgresServer(dsn, f"{OPTIONS_VARIABLE}")


def _start_cluster() -> PostgresServer:
    binaries = _find_binaries()
    if binaries is None:
        raise Unavailable(
            "no PostgreSQL server: set M2MGW_TEST_STORE_POSTGRES='{\"dsn\": ...}', or install"
            " the server binaries (initdb, pg_ctl; tests/pg-setup does it with apt-get)"
        )
    run_as: list[str] = []
    directory = tempfile.mkdtemp(prefix="m2mgw-pg-")
    if os.geteuid() == 0:
        import pwd

        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(directory, ignore_errors=True)
            raise Unavailable(
                "initdb refuses to run as root and there is no 'postgres' user to run it as"
            ) from None
        os.chown(directory, user.pw_uid, user.pw_gid)
        runuser = shutil.which("runuser")
        run_as = [runuser, "-u", "postgres", "--"] if runuser else ["su", "postgres", "-c"]
    data = os.path.join(directory, "data")
    port = random.randint(20000, 60000)

    def command(*args: str) -> list[str]:
        if run_as[:1] == ["su"]:
            return [*run_as, " ".join(f"'{a}'" for a in args)]
        return [*run_as, *args]

    def run(*args: str) -> None:
        done = subprocess.run(command(*args), capture_output=True, text=True, check=False)
        if done.returncode != 0:
            shutil.rmtree(directory, ignore_errors=True)
            raise Unavailable(
                f"{os.path.basename(args[0])} failed: {(done.stderr or done.stdout).strip()[-500:]}"
            )

    pg_ctl = os.path.join(binaries, "pg_ctl")
    run(
        os.path.join(binaries, "initdb"),
        "-D",
        data,
        "-U",
        "postgres",
        "-A",
        "trust",
        "-E",
        "UTF8",
        "--locale=C",
        "--no-sync",
    )
    settings = (
        f"-c listen_addresses='' -k {directory} -p {port} -c fsync=off"
        " -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        " -c deadlock_timeout=200ms"
    )
    log_file = os.path.join(directory, "server.log")
    run(pg_ctl, "-D", data, "-l", log_file, "-w", "-t", "60", "-o", settings, "start")
    stop = [command(pg_ctl, "-D", data, "-m", "immediate", "-w", "stop"), ["rm", "-rf", directory]]
    dsn = f"host={directory} port={port} user=postgres dbname=postgres"
    return PostgresServer(dsn, f"a throwaway cluster in {directory}", _stop=stop)


def find_server() -> PostgresServer:
    """
    The server the tests use (see the module's docstring for the order).

    :raise Unavailable: none.
    """
    server = _from_environment()
    if server is not None:
        return server
    return _start_cluster()


def in_ci() -> bool:
    """True when ``CI`` says the tests run under continuous integration."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
