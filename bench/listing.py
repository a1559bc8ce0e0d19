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
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine_and_commit  # noqa: E402
from serve_app.service import Services  # noqa: E402
from serve_app.settings import Settings  # noqa: E402
from tests.support import pg  # noqa: E402
from tests.support.images import object_photo  # noqa: E402

OTHER_BACKEND = "trellis"  # a second backend's queue, which must not count in "cpu" positions


def fill(url: str, rows: int, queued: int) -> None:
    """--rows tasks of 100 accounts, the newest --queued of them still queued for "cpu" (half of
    those at the batch priority, -10, in batch "bench-queued"), plus --queued / 10 older ones
    queued for another backend; 10 % of the finished tasks failed. Every 4th account's oldest
    tenth is batch "bench-batch": listing it walks past all the account's newer tasks unless an
    index leads there."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO accounts (id, name)"
            " SELECT 'acct' || i, 'bench' FROM generate_series(0, 99) i"
        )
        queued = min(queued, rows // 2)
        conn.execute(
            """
            INSERT INTO tasks (id, account_id, backend, status, priority, options, inputs,
                               max_attempts, batch_id, created_at, finished_at)
            SELECT gen_random_uuid(), 'acct' || (i %% 100), 'cpu',
                   CASE WHEN q THEN 'queued' WHEN (i / 100) %% 10 = 3 THEN 'failed'
                        ELSE 'succeeded' END::task_status,
                   CASE WHEN q AND i %% 4 = 0 THEN -10 ELSE 0 END,
                   '{}', '[]', 3,
                   CASE WHEN q AND i %% 4 = 0 THEN 'bench-queued'
                        WHEN i %% 4 = 0 AND i <= %(rows)s / 10 THEN 'bench-batch' END,
                   clock_timestamp() - make_interval(secs => %(rows)s - i),
                   CASE WHEN q THEN NULL ELSE clock_timestamp() END
            FROM generate_series(1, %(rows)s) AS i,
                 LATERAL (SELECT i > %(rows)s - 2 * %(queued)s AND i %% 2 = 0 AS q) AS s
            """,
            {"rows": rows, "queued": queued},
        )
        conn.execute(
            """
            INSERT INTO tasks (id, account_id, backend, status, options, inputs, max_attempts,
                               created_at)
            SELECT gen_random_uuid(), 'acct' || (i %% 100), %(other)s, 'queued', '{}', '[]', 3,
                   clock_timestamp() - make_interval(secs => %(rows)s + i)
            FROM generate_series(1, %(n)s) AS i
            """,
            {"n": queued // 10, "other": OTHER_BACKEND, "rows": rows},
        )
        conn.execute("VACUUM ANALYZE")  # every table: the counters of 0012 too, where present


def timed(fn: Callable[[], object], runs: int) -> tuple[float, float]:
    samples = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1000)
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(len(samples) * 0.99))]


def last_queued(services: Services, account: str) -> dict[str, Any] | None:
    rows, _ = services.queue.list_tasks(account, limit=1, status="queued")
    return services.queue.get(rows[0]["id"], account) if rows else None


def measure(
    services: Services, runs: int, positions: dict[str, int]
) -> dict[str, tuple[float, float]]:
    """p50/p99 ms of each read (and a submit) through the service layer; the queue positions
    read go into `positions`."""
    queue = services.queue
    account = "acct0"  # one of the busiest: 1 % of the table
    _, deep = queue.list_tasks(account, limit=20)
    for _ in range(49):
        _, deep = queue.list_tasks(account, limit=20, cursor=deep)
    _, deep_failed = queue.list_tasks(account, limit=20, status="failed")
    for _ in range(9):
        _, deep_failed = queue.list_tasks(account, limit=20, status="failed", cursor=deep_failed)
    photo = object_photo(512, seed=1, fmt="JPEG")
    out = {
        "list: first page": timed(lambda: queue.list_tasks(account, limit=20), runs),
        "list: page 50 (cursor)": timed(
            lambda: queue.list_tasks(account, limit=20, cursor=deep), runs
        ),
        "list: status=failed": timed(
            lambda: queue.list_tasks(account, limit=20, status="failed"), runs
        ),
        "list: status=failed, page 10": timed(
            lambda: queue.list_tasks(account, limit=20, status="failed", cursor=deep_failed),
            runs,
        ),
        "list: batch_id": timed(
            lambda: queue.list_tasks(account, limit=20, batch_id="bench-batch"), runs
        ),
    }
    # The newest queued task of acct0 is a batch task (priority -10) at the back of the whole
    # queue; acct2's is an interactive one behind every other interactive task.
    for label, who in (
        ("get: batch task, back of the queue", "acct0"),
        ("get: interactive task, last of its priority", "acct2"),
    ):
        task = last_queued(services, who)
        if task is not None:
            positions[label] = task["queue_position"]
            out[label] = timed(lambda t=task, w=who: queue.get(t["id"], w), runs)
    out["submit (512 px JPEG)"] = timed(
        lambda: services.submit("acct1", [photo], {"backend": "cpu"}), max(20, runs // 5)
    )
    return out


def explain(url: str) -> None:
    """EXPLAIN ANALYZE of the hot reads on the full table (the plans behind the figures)."""
    import psycopg

    from serve_app.store.db import query

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET plan_cache_mode = force_custom_plan")
        task = conn.execute(
            "SELECT id, account_id FROM tasks WHERE status = 'queued' AND backend = 'cpu'"
            " ORDER BY priority, created_at DESC, id DESC LIMIT 1"
        ).fetchone()
        listing = {
            "account_id": "acct0",
            "status": None,
            "batch_id": None,
            "cursor_created_at": None,
            "cursor_id": None,
            "limit": 21,
        }
        cases: list[tuple[str, str, dict[str, Any]]] = [
            ("list_tasks, first page", "list_tasks", listing),
            ("list_tasks, status=failed", "list_tasks", {**listing, "status": "failed"}),
            ("list_tasks, batch_id", "list_tasks", {**listing, "batch_id": "bench-batch"}),
        ]
        if task:
            cases.append(
                (
                    "get_task, last queued",
                    "get_task",
                    {"id": task[0], "account_id": task[1], "exact_up_to": 1000},
                )
            )
        for label, name, params in cases:
            plan = conn.execute(
                "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + query(name), params
            ).fetchall()
            print(f"-- {label}")
            for (line,) in plan:
                print("   " + line)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--queued", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--explain", action="store_true", help="print the plans of the reads")
    args = parser.parse_args()
    print(machine_and_commit())
    results = {}
    positions: dict[str, int] = {}
    load = os.getloadavg()
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
                results[label] = measure(services, args.runs, positions)
                if label == "full" and args.explain:
                    explain(url)
            finally:
                services.db.close()
                clone.close()
        del server
    print(f"load average (1, 5, 15 min): before {load}, after {os.getloadavg()}")
    print(f"table: {args.rows} tasks of 100 accounts, {args.queued} queued (vs 40 tasks)")
    for what, position in positions.items():
        print(f"queue_position read by '{what}': {position} (full table)")
    print("| operation | empty p50 ms | empty p99 ms | full p50 ms | full p99 ms |")
    print("|---|---|---|---|---|")
    for what, (p50, p99) in results["full"].items():
        e50, e99 = results["empty"].get(what, (float("nan"), float("nan")))
        print(f"| {what} | {e50:.2f} | {e99:.2f} | {p50:.2f} | {p99:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
