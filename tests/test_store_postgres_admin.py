"""``m2mgw-admin db status`` and ``db migrate``, on the sqlite and the postgres store."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import psycopg
import pytest
import pytest_twisted

from m2mgw.store import postgres, sqlite
from tests.pgharness import PostgresServer
from tests.test_admin_cli import InProcess, write_config

SQLITE_LATEST = sqlite.shipped_migrations()[-1].version
PG_LATEST = postgres.shipped_migrations()[-1].version


def postgres_config(tmp_path: Path, dsn: str) -> InProcess:
    """m2mgw-admin on a configuration whose store is the postgres database ``dsn``."""
    path = Path(write_config(tmp_path, backend="postgres"))
    path.write_text(path.read_text() + f"[store.postgres]\ndsn = {dsn}\n")
    return InProcess(str(path))


@pytest_twisted.ensureDeferred
async def test_sqlite_status_then_migrate(tmp_path: Path) -> None:
    admin = InProcess(write_config(tmp_path))
    status = await admin("db", "status", "--json")
    assert status.code == 0, status.stderr
    assert status.json() == {
        "store": "sqlite",
        "shipped_level": SQLITE_LATEST,
        "database_level": 0,
        "pending": [f"{m.version:04d}_{m.name}" for m in sqlite.shipped_migrations()],
    }
    assert not (tmp_path / "data" / "m2mgw.sqlite").exists()  # status changes nothing
    migrated = await admin("db", "migrate")
    assert migrated.code == 0, migrated.stderr
    assert migrated.stdout.startswith(f"store sqlite: schema level 0 -> {SQLITE_LATEST}, applied")
    with sqlite3.connect(tmp_path / "data" / "m2mgw.sqlite") as connection:
        assert sqlite.schema_level(connection) == SQLITE_LATEST
    status = await admin("db", "status")
    assert status.stdout.splitlines() == [
        "store sqlite",
        f"schema level shipped {SQLITE_LATEST}, in the database {SQLITE_LATEST}",
        "up to date",
    ]
    again = await admin("db", "migrate", "--json")
    assert again.json()["applied"] == []


@pytest_twisted.ensureDeferred
async def test_postgres_status_then_migrate(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    dsn = postgres_server.new_database(migrated=False)
    try:
        admin = postgres_config(tmp_path, dsn)
        status = await admin("db", "status")
        assert status.code == 0, status.stderr
        assert status.stdout.splitlines()[:2] == [
            "store postgres",
            f"schema level shipped {PG_LATEST}, in the database 0",
        ]
        assert "pending migrations: 0001_initial, " in status.stdout
        migrated = await admin("db", "migrate", "--json")
        assert migrated.code == 0, migrated.stderr
        assert migrated.json()["from_level"] == 0
        assert migrated.json()["to_level"] == PG_LATEST
        assert len(migrated.json()["applied"]) == PG_LATEST
        status = await admin("db", "status", "--json")
        assert status.json()["database_level"] == PG_LATEST
        assert status.json()["pending"] == []
        audit = await admin("security-events", "--json")
        assert [e["reason"] for e in audit.json()["events"]] == ["db-migrate"]
    finally:
        postgres_server.drop_database(dsn)


@pytest_twisted.ensureDeferred
async def test_postgres_newer_database_is_reported_and_not_migrated(
    tmp_path: Path, postgres_dsn: str
) -> None:
    with psycopg.connect(postgres_dsn, autocommit=True) as connection:
        connection.execute(
            "INSERT INTO m2mgw_schema (version, name, applied_at) VALUES (99, 'future', now())"
        )
    admin = postgres_config(tmp_path, postgres_dsn)
    status = await admin("db", "status")
    assert "the database is newer than this m2mgw: upgrade m2mgw" in status.stdout
    migrated = await admin("db", "migrate")
    assert "schema level 99, newer than this m2mgw knows" in migrated.assert_one_line_error()


@pytest_twisted.ensureDeferred
async def test_an_unreachable_postgres_is_a_one_line_error(tmp_path: Path) -> None:
    admin = postgres_config(tmp_path, f"host={tmp_path} port=1 dbname=x connect_timeout=2")
    result = await admin("db", "status")
    assert "cannot connect to PostgreSQL" in result.assert_one_line_error()


@pytest.mark.parametrize("backend", ["memory"])
@pytest_twisted.ensureDeferred
async def test_a_store_without_migrations_is_refused(tmp_path: Path, backend: str) -> None:
    admin = InProcess(write_config(tmp_path, backend=backend))
    result = await admin("db", "status")
    assert "has no schema migrations" in result.assert_one_line_error()
