"""An embedded PostgreSQL for laptops and tests (pgserver), used when DATABASE_URL is unset.

It listens on a Unix socket inside the run folder only: nothing is exposed on the network."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import psycopg

from serve_app.settings import Settings, get_settings

log = logging.getLogger(__name__)


def start_embedded_postgres(pgdata: Path, database: str = "photo3d") -> tuple[str, Any]:
    """Start (or reuse) the server in `pgdata`; return (url of `database`, server handle).

    The server stops when the last process holding a handle exits."""
    try:
        import pgserver
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise SystemExit(
            "DATABASE_URL is not set and the embedded PostgreSQL is not installed: "
            "`pip install 'photo3d[embedded]'` or set DATABASE_URL=postgresql://..."
        ) from exc
    pgdata = pgdata.resolve()
    pgdata.mkdir(parents=True, exist_ok=True)
    _forget_dead_handles(pgdata)
    server = pgserver.get_server(pgdata, cleanup_mode="stop")
    admin_url = server.get_uri()
    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (database,)
        ).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{database}"')
    url = server.get_uri(database)
    log.info("embedded PostgreSQL running in %s", pgdata)
    return url, server


def _forget_dead_handles(pgdata: Path) -> None:
    """Drop from pgserver's list of handle holders the processes that are gone.

    pgserver stops the server when the last process holding a handle exits, and counts them in
    `<pgdata>/.handle_pids.json`. A process killed before its exit hook ran (SIGKILL, SIGTERM, a
    crash) stays listed for ever, and then no exit stops the server: it outlived `make run`."""
    import psutil
    from pgserver.postgres_server import PostgresServer

    def running(pid: int) -> bool:
        try:
            return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
        except psutil.NoSuchProcess:
            return False

    path = pgdata / ".handle_pids.json"
    with PostgresServer._lock:  # pgserver's own lock around that file
        try:
            pids = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        alive = [pid for pid in pids if running(pid)]
        if alive != pids:
            log.info(
                "embedded PostgreSQL: forgetting handles of ended processes %s",
                sorted(set(pids) - set(alive)),
            )
            path.write_text(json.dumps(alive))


def database_url_or_embedded(settings: Settings) -> tuple[str, Any]:
    """DATABASE_URL, or the embedded server in the run folder (started, or the one `make run`
    already runs there); return (url, server handle or None). Keep the handle while you use it.

    The URL is also put in the environment (Ray workers inherit it) and the settings are read
    again, so `get_settings()` has it from then on."""
    if settings.database_url:
        return settings.database_url, None
    url, server = start_embedded_postgres(settings.run_dir / "pgdata")
    os.environ["DATABASE_URL"] = url
    get_settings.cache_clear()
    return url, server
