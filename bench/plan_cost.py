"""What planning costs PostgreSQL per statement: the task read behind GET /task run 2,000 times
on one connection, prepared (psycopg's default after five runs: PostgreSQL keeps a plan) and
unprepared (planned on every run, as every statement was under plan_cache_mode =
force_custom_plan), with the backend process's CPU time per run. Prints the machine and commit.

    .venv/bin/python bench/plan_cost.py [--runs 2000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import psutil
import psycopg
from psycopg.rows import dict_row

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine_and_commit  # noqa: E402
from serve_app.store.db import query  # noqa: E402
from tests.support import pg  # noqa: E402
from tests.support.images import object_photo  # noqa: E402


def backend_cpu_ms(
    conn: psycopg.Connection, sql: str, params: dict, *, prepare: bool | None, runs: int
) -> float:
    """CPU ms of this connection's server process per run of `sql`."""
    pid = conn.execute("SELECT pg_backend_pid() AS pid").fetchone()["pid"]  # type: ignore[index]
    process = psutil.Process(pid)
    for _ in range(20):  # past psycopg's prepare threshold and PostgreSQL's five custom plans
        conn.execute(sql, params, prepare=prepare).fetchone()
    before = sum(process.cpu_times()[:2])
    for _ in range(runs):
        conn.execute(sql, params, prepare=prepare).fetchone()
    return (sum(process.cpu_times()[:2]) - before) * 1000 / runs


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000)
    args = parser.parse_args()
    print(machine_and_commit())
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="p3d-plans-") as tmp:
        work = Path(tmp)
        admin, server = pg.admin_url(work / "pg")
        pg.make_template(admin)
        clone = pg.clone_database(admin, prefix="plans")
        url = next(clone)
        os.environ.update({"PHOTO3D_DATABASE_URL": url, "PHOTO3D_RUN_DIR": str(work / "run")})
        from serve_app.service import Services
        from serve_app.settings import Settings

        services = Services.from_settings(Settings())
        services.db.open(wait=True)
        row, _ = services.submit("local", [object_photo(256, fmt="JPEG")], {"backend": "cpu"})
        services.db.close()
        statements = {
            "get_task (GET /task)": (
                query("get_task"),
                {"id": row["id"], "account_id": "local", "exact_up_to": 1000},
            ),
            "primary-key lookup": ("SELECT * FROM tasks WHERE id = %(id)s", {"id": row["id"]}),
        }
        print("| statement | prepared: backend CPU ms/run | planned every run | ratio |")
        print("|---|---|---|---|")
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            for name, (sql, params) in statements.items():
                kept = backend_cpu_ms(conn, sql, params, prepare=None, runs=args.runs)
                planned = backend_cpu_ms(conn, sql, params, prepare=False, runs=args.runs)
                print(f"| {name} | {kept:.3f} | {planned:.3f} | {planned / kept:.1f}× |")
        clone.close()
        del server
    return 0


if __name__ == "__main__":
    sys.exit(main())
