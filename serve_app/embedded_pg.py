"""An embedded PostgreSQL for laptops and tests (pgserver), used when DATABASE_URL is unset.

It listens on a Unix socket inside the run folder only: nothing is exposed on the network."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import psycopg

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
