"""Reads and writes at scale: listing, queue position and submit with a million tasks, on the
real PostgreSQL (embedded pgserver), through the service layer (no HTTP), side by side with an
empty table in the same run.

    .venv/bin/python bench/listing.py [--rows 1000000] [--queued 100000] [--runs 200]

The table holds --rows tasks of 100 accounts, --queued of them queued for one backend; the
account read is one of the busiest. Figures: p50/p99 milliseconds of the first page, a deep
cursor (page 50), a status filter, the queue position of the last queued task, and a submit
(photo validated, stored, task inserted). Prints the machine and the commit.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serve_app.service import Services  # noqa: E402
from serve_app.settings import Settings  # noqa: E402
from tests.support import pg  # noqa: E402
from tests.support.images import object_photo  # noqa: E402


def fill(url: str, rows: int, queued: int) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO accounts (id, name)"
            " SELECT 'acct' || i, 'bench' FROM generate_series(0, 99) i"
        )
        conn.execute(
            """
            INSERT INTO tasks (id, account_id, backend, status, options, inputs, max_attempts,
                               created_at, finished_at)
            SELECT gen_random_uuid(), 'acct' || (i %% 100),
                   'cpu',
                   CASE WHEN i > %(rows)s - %(queued)s AND i %% 100 < 50 THEN 'queued'
                        WHEN i %% 10 = 0 THEN 'failed' ELSE 'succeeded' END::task_status,
                   '{}', '[]', 3,
                   clock_timestamp() - make_interval(secs => %(rows)s - i),
                   CASE WHEN i > %(rows)s - %(queued)s THEN NULL ELSE clock_timestamp() END
            FROM generate_series(1, %(rows)s) AS i
            """,
            {"rows": rows, "queued": queued},
        )
        conn.execute("VACUUM ANALYZE tasks")


def timed(fn: Callable[[], object], runs: int) -> tuple[float, float]:
    samples = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1000)
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(len(samples) * 0.99))]


def measure(services: Services, account: str, runs: int) -> dict[str, tuple[float, float]]:
    queue = services.queue
    _, deep = queue.list_tasks(account, limit=20)
    for _ in range(49):
        _, deep = queue.list_tasks(account, limit=20, cursor=deep)
    last_queued = queue.list_tasks(account, limit=1, status="queued")[0]
    photo = object_photo(512, seed=1, fmt="JPEG")
    out = {
        "list: first page": timed(lambda: queue.list_tasks(account, limit=20), runs),
        "list: page 50 (cursor)": timed(
            lambda: queue.list_tasks(account, limit=20, cursor=deep), runs
        ),
        "list: status=failed": timed(
            lambda: queue.list_tasks(account, limit=20, status="failed"), runs
        ),
    }
    if last_queued:
        task_id = last_queued[0]["id"]
        out["get with queue position"] = timed(lambda: queue.get(task_id, account), runs)
    out["submit (512 px JPEG)"] = timed(
        lambda: services.submit(account, [photo], {"backend": "cpu"}), max(20, runs // 5)
    )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--queued", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; commit {commit}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="p3d-l-") as tmp:
        admin, server = pg.admin_url(Path(tmp) / "pg")
        pg.make_template(admin)
        for label, rows, queued in (("empty", 40, 20), ("full", args.rows, args.queued)):
            clone = pg.clone_database(admin, prefix=label)
            url = next(clone)
            fill(url, rows, queued)
            settings = Settings(database_url=url, run_dir=Path(tmp) / label, max_active_tasks=10**9)
            services = Services.from_settings(settings)
            services.db.open(wait=True)
            try:
                results[label] = measure(services, "acct0", args.runs)
            finally:
                services.db.close()
                clone.close()
        del server
    print(f"table: {args.rows} tasks of 100 accounts, {args.queued} queued (vs 40 tasks)")
    print("| operation | empty p50 ms | empty p99 ms | full p50 ms | full p99 ms |")
    print("|---|---|---|---|---|")
    for what, (p50, p99) in results["full"].items():
        e50, e99 = results["empty"].get(what, (float("nan"), float("nan")))
        print(f"| {what} | {e50:.2f} | {e99:.2f} | {p50:.2f} | {p99:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
