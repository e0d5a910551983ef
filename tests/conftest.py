"""
Session-wide fixtures: a PostgreSQL server for the postgres store's tests
(see :mod:`tests.pgharness`).

A test that needs PostgreSQL asks for ``postgres_dsn`` (a fresh, migrated
database) or ``postgres_server``.  Without a server those tests are skipped
with the reason, which is repeated in the summary -- except with ``CI=true``,
where they fail.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest

from tests import pgharness

_unavailable: list[str] = []


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[pgharness.PostgresServer]:
    """A PostgreSQL server for this session (started here, or given by the environment)."""
    reason = ""
    try:
        server = pgharness.find_server()
    except pgharness.Unavailable as exc:
        reason = f"PostgreSQL tests not run: {exc}"
    if reason:
        if pgharness.in_ci():
            pytest.fail(f"{reason} (CI=true: a PostgreSQL is required)", pytrace=False)
        _unavailable.append(reason)
        warnings.warn(pytest.PytestWarning(reason), stacklevel=1)
        pytest.skip(reason)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_dsn(postgres_server: pgharness.PostgresServer) -> Iterator[str]:
    """The DSN of a fresh schema at the shipped level, dropped after the test."""
    dsn = postgres_server.new_database()
    yield dsn
    postgres_server.drop_database(dsn)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say loudly that the PostgreSQL tests were skipped, and why."""
    if _unavailable:
        terminalreporter.write_sep("!", "PostgreSQL tests SKIPPED", yellow=True, bold=True)
        terminalreporter.write_line(_unavailable[0])
