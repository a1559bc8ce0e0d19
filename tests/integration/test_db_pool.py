"""The connection pool: a connection that died while idle in the pool is replaced before use;
one that died moments after its last use fails one call and is then replaced."""

from __future__ import annotations

import psycopg
import pytest

from serve_app.errors import ServiceUnavailable
from serve_app.store import db as db_module
from serve_app.store.db import Database


def backend_pid(db: Database) -> int:
    with db.connection() as conn:
        row = conn.execute("SELECT pg_backend_pid() AS pid").fetchone()
        assert row is not None
        return int(row["pid"])


def terminate(database_url: str, pid: int) -> None:
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))


@pytest.fixture
def db(database_url: str):
    database = Database(database_url, min_size=1, max_size=1)
    database.open(wait=True)
    yield database
    database.close()


def test_a_connection_dead_while_idle_is_replaced_before_use(
    db: Database, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = backend_pid(db)
    terminate(database_url, first)
    monkeypatch.setattr(db_module, "CHECK_IDLE_SECONDS", 0.0)  # idle "long enough": checked
    assert backend_pid(db) != first  # no error: the pool checked it and opened another


def test_a_recently_used_connection_is_not_checked_but_recovers(
    db: Database, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db_module, "CHECK_IDLE_SECONDS", 3600.0)  # never idle long enough
    first = backend_pid(db)
    terminate(database_url, first)
    with pytest.raises(ServiceUnavailable):  # no check round trip: this one call fails (503)
        backend_pid(db)
    assert backend_pid(db) != first  # the broken connection was discarded, not reused


# The request path's pool on the event loop (issue 11): the same guarantees.


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def async_backend_pid(db: Database) -> int:
    async with db.aconnection() as conn:
        cursor = await conn.execute("SELECT pg_backend_pid() AS pid")
        row = await cursor.fetchone()
        assert row is not None
        return int(row["pid"])


@pytest.mark.anyio
async def test_the_event_loop_pool_replaces_a_connection_dead_while_idle(
    db: Database, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    try:
        first = await async_backend_pid(db)
        terminate(database_url, first)
        monkeypatch.setattr(db_module, "CHECK_IDLE_SECONDS", 0.0)
        assert await async_backend_pid(db) != first
        monkeypatch.setattr(db_module, "CHECK_IDLE_SECONDS", 3600.0)
        second = await async_backend_pid(db)
        terminate(database_url, second)
        with pytest.raises(ServiceUnavailable):
            await async_backend_pid(db)
        assert await async_backend_pid(db) not in (first, second)
    finally:
        await db.aclose()


@pytest.mark.anyio
async def test_the_event_loop_pool_reads_named_queries_and_translates_errors(db: Database) -> None:
    try:
        row = await db.afetch_one("get_task", {"id": None, "account_id": "x", "exact_up_to": 1})
        assert row is None
        rows = await db.afetch_all_unflushed("count_request", {"key": "k-async", "window": 60})
        assert rows[0]["requests"] == 1
        rows = await db.afetch_all_unflushed("count_request", {"key": "k-async", "window": 60})
        assert rows[0]["requests"] == 2  # the same window, counted again
    finally:
        await db.aclose()
