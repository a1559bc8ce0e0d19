"""PostgreSQL access: one connection pool per process, queries loaded by name from SQL files,
and the one place where driver errors become the project's own exceptions."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from functools import lru_cache
from importlib import resources
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout

from serve_app.errors import Conflict, InvalidInput, ServiceUnavailable

log = logging.getLogger(__name__)

Row = dict[str, Any]

# A connection used this recently is not checked with a round trip when it is taken from the
# pool again: under load every checkout would pay one (`SELECT 1`) for a connection that just
# worked. One idle longer is checked, so a restarted server's dead connections are replaced.
CHECK_IDLE_SECONDS = 2.0


def check_if_idle(conn: psycopg.Connection[Any]) -> None:
    """The pool's checkout check, skipped for a connection returned moments ago."""
    if time.monotonic() - getattr(conn, "_photo3d_returned_at", 0.0) > CHECK_IDLE_SECONDS:
        ConnectionPool.check_connection(conn)


async def acheck_if_idle(conn: psycopg.AsyncConnection[Any]) -> None:
    """check_if_idle for the event loop's pool."""
    if time.monotonic() - getattr(conn, "_photo3d_returned_at", 0.0) > CHECK_IDLE_SECONDS:
        await AsyncConnectionPool.check_connection(conn)


@lru_cache(maxsize=1)
def queries() -> dict[str, str]:
    """All named queries of every `sql/*.sql` file (one file per feature); names are unique."""
    found: dict[str, str] = {}
    folder = resources.files("serve_app.store").joinpath("sql")
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".sql"):
            continue
        parts = re.split(r"^-- name: (\w+)\s*$", entry.read_text(), flags=re.MULTILINE)
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            if name in found:
                raise RuntimeError(f"query {name!r} is defined twice (in {entry.name})")
            found[name] = body.strip()
    return found


def query(name: str) -> str:
    """The SQL text of the query called `name`."""
    return queries()[name]


# A filter that is on or off by a parameter: `%(status)s::task_status IS NULL OR status = …`.
_OPTIONAL_FILTER = re.compile(r"%\(\w+\)s(::[\w\[\]]+)?\s+IS NULL\s+OR")


@lru_cache(maxsize=1)
def planned_per_call() -> frozenset[str]:
    """Queries with optional filters. psycopg prepares a statement after 5 runs, and PostgreSQL
    may then switch to a generic plan that cannot see which filters are off: the deep-cursor
    listing became a 405k-row filter (411 ms). These run unprepared, so each run is planned with
    its values; every other query keeps its prepared plan (planning the task read's queue
    position on every GET cost PostgreSQL more CPU than running it, issue 11)."""
    return frozenset(name for name, sql in queries().items() if _OPTIONAL_FILTER.search(sql))


def prepare(name: str) -> bool | None:
    """psycopg's `prepare=` for query `name`: False for those planned per call, else its
    default (prepared after a few runs)."""
    return False if name in planned_per_call() else None


def named(name: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """The arguments of `conn.execute` (sync or async) that run query `name`:
    `conn.execute(**named(name, params))`, prepared or planned per call as `prepare` says."""
    return {"query": query(name), "params": params or {}, "prepare": prepare(name)}


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """The one place where driver errors become the project's own: a lost or refused connection
    is ServiceUnavailable (503, retry), a unique-key clash is Conflict (409), a value the
    database cannot hold is InvalidInput (422)."""
    try:
        yield
    except psycopg.errors.UniqueViolation as exc:
        constraint = exc.diag.constraint_name or "a unique key"
        raise Conflict(f"that already exists ({constraint})", code="conflict") from exc
    except psycopg.DataError as exc:  # a value PostgreSQL cannot store (e.g. text with NUL)
        raise InvalidInput(
            "a value in the request cannot be stored (NUL byte or out of range)",
            code="invalid_value",
        ) from exc
    except (psycopg.OperationalError, PoolTimeout) as exc:
        log.warning("database unavailable: %s", type(exc).__name__)
        raise ServiceUnavailable("the database is unavailable; retry shortly") from exc


class Database:
    """A psycopg 3 connection pool with helpers that run one named query."""

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 8, timeout: float = 5.0):
        self.url = url
        self.max_size, self.timeout = max_size, timeout
        self.connect_kwargs: dict[str, Any] = {
            "row_factory": dict_row,
            "autocommit": True,
            "connect_timeout": int(timeout),  # (queries with optional filters: `prepare`)
        }
        self.pool = ConnectionPool(
            url,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            open=False,
            check=check_if_idle,
            kwargs=self.connect_kwargs,
            name="photo3d",
        )
        # The request path's reads on the event loop (issue 11): see `aconnection`.
        # One per event loop (an app has one; test clients may start several): (pool, opening).
        self._apools: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[AsyncConnectionPool, asyncio.Future[None]]
        ] = weakref.WeakKeyDictionary()

    def open(self, wait: bool = False) -> None:
        """Open the pool; with wait=True fail fast when the server is unreachable."""
        self.pool.open(wait=wait, timeout=self.pool.timeout)

    def close(self) -> None:
        self.pool.close()

    # --- on the event loop (issue 11) ----------------------------------------------------------
    # The Ingress's hottest reads (the key lookup, the rate window, GET /task) run on the event
    # loop with psycopg's async pool instead of a hop to the threadpool: in a Serve replica each
    # hop cost more CPU than the query (anyio walks every task of Ray's busy loop per hop).

    async def _async_pool(self) -> AsyncConnectionPool:
        """The running event loop's pool, opened on its first use."""
        loop = asyncio.get_running_loop()
        found = self._apools.get(loop)
        if found is None:
            pool = AsyncConnectionPool(
                self.url,
                min_size=1,
                max_size=self.max_size,
                timeout=self.timeout,
                open=False,
                check=acheck_if_idle,
                kwargs=self.connect_kwargs,
                name="photo3d-async",
            )
            found = self._apools[loop] = (pool, asyncio.ensure_future(pool.open()))
        pool, opening = found
        if not opening.done():
            await opening
        return pool

    async def aclose(self) -> None:
        """Close the running event loop's pool (the app's lifespan calls this on shutdown)."""
        found = self._apools.pop(asyncio.get_running_loop(), None)
        if found is not None and not found[0].closed:
            await found[0].close()

    @contextlib.asynccontextmanager
    async def aconnection(self) -> AsyncIterator[psycopg.AsyncConnection[Row]]:
        """A pooled autocommit connection on the running event loop; errors are translated."""
        pool = await self._async_pool()
        with translate_errors():
            async with pool.connection() as conn:
                yield conn  # type: ignore[misc]
                conn._photo3d_returned_at = time.monotonic()  # type: ignore[attr-defined]

    async def afetch_one(self, name: str, params: dict[str, Any] | None = None) -> Row | None:
        """fetch_one on the event loop."""
        async with self.aconnection() as conn:
            cursor = await conn.execute(**named(name, params))
            return await cursor.fetchone()

    async def afetch_all_unflushed(
        self, name: str, params: dict[str, Any] | None = None
    ) -> list[Row]:
        """fetch_all_unflushed on the event loop."""
        async with self.aconnection() as conn, conn.transaction():
            await conn.execute("SET LOCAL synchronous_commit TO off")
            cursor = await conn.execute(**named(name, params))
            return await cursor.fetchall()

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Row]]:
        """A pooled autocommit connection; errors are translated."""
        with translate_errors(), self.pool.connection() as conn:
            yield conn  # type: ignore[misc]
            conn._photo3d_returned_at = time.monotonic()  # type: ignore[attr-defined]

    def fetch_all(self, name: str, params: dict[str, Any] | None = None) -> list[Row]:
        """Run query `name` and return every row."""
        with self.connection() as conn:
            return conn.execute(**named(name, params)).fetchall()

    def fetch_one(self, name: str, params: dict[str, Any] | None = None) -> Row | None:
        """Run query `name` and return its first row, or None."""
        with self.connection() as conn:
            return conn.execute(**named(name, params)).fetchone()

    def fetch_all_unflushed(self, name: str, params: dict[str, Any] | None = None) -> list[Row]:
        """Run write `name` without waiting for its commit to reach the disk
        (`synchronous_commit = off`): for counters a crash may lose the last fraction of a second
        of (rate windows), never for tasks, money or keys. It saves the commit's fsync, the
        largest part of a small request's time, and holds the row's lock that much shorter."""
        with self.connection() as conn, conn.transaction():
            conn.execute("SET LOCAL synchronous_commit TO off")
            return conn.execute(**named(name, params)).fetchall()

    def execute(self, name: str, params: dict[str, Any] | None = None) -> int:
        """Run statement `name` that returns no rows; return the number of rows affected."""
        with self.connection() as conn:
            return conn.execute(**named(name, params)).rowcount

    def fetch_one_locked(
        self, lock: str, name: str, params: dict[str, Any] | None = None
    ) -> Row | None:
        """Run query `name` in a transaction holding the advisory lock `lock`: a check and a
        write in one query (count, then insert) cannot interleave with another holder's."""
        with self.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (lock,))
            return conn.execute(**named(name, params)).fetchone()

    def ping(self) -> None:
        """Raise ServiceUnavailable unless the database answers."""
        with self.connection() as conn:
            conn.execute("SELECT 1")
