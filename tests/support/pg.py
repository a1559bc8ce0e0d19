"""A real PostgreSQL for tests: PHOTO3D_TEST_DATABASE_URL if set, else an embedded pgserver.

A template database gets the migrations once; each test clones it (fast and isolated)."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from serve_app.store.migrate import migrate

TEMPLATE = "photo3d_test_template"


def server_folder(root: Path, prefix: str) -> Path:
    """A new folder for an embedded server's data, under `root` (the project's .run folder),
    not pytest's tmp dir: pytest resets its tmp root to mode 0700, which would lock out the
    `pgserver` system user that the embedded server runs as under root."""
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=root))


def admin_url(root: Path) -> tuple[str, Any]:
    """URL of a database we may CREATE DATABASE from, and the server handle (keep it alive).
    The data directory is a `server_folder` under `root`."""
    url = os.environ.get("PHOTO3D_TEST_DATABASE_URL")
    if url:
        return url, None
    import pgserver

    pgdata = server_folder(root, "test-pg-")
    server = pgserver.get_server(pgdata, cleanup_mode="delete")
    return server.get_uri(), server


def with_database(url: str, name: str) -> str:
    """The same server URL pointing at database `name`."""
    conninfo = psycopg.conninfo.conninfo_to_dict(url)
    conninfo["dbname"] = name
    return psycopg.conninfo.make_conninfo(**conninfo)


def make_template(admin: str) -> None:
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(TEMPLATE))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE)))
    migrate(with_database(admin, TEMPLATE))


def clone_database(admin: str, prefix: str = "t") -> Iterator[str]:
    """Yield the URL of a fresh copy of the template; drop it afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(TEMPLATE)
            )
        )
    try:
        yield with_database(admin, name)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def stop_server(server: Any) -> None:
    from pgserver._commands import pg_ctl

    pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=server.pgdata, user=server.system_user)


def start_server(server: Any) -> None:
    with server._lock:
        server.ensure_postgres_running()
