"""Queue throughput: claim + finish per second with 1, 2, 4 and 8 workers over a deep backlog of
several backends, on the real PostgreSQL (embedded pgserver), through TaskQueue itself.

    .venv/bin/python bench/queue_throughput.py [--queued 100000] [--seconds 10] [--workers 1,2,4,8]

Each worker is a thread with its own connection pool (as each generator replica has), claiming
for one backend and finishing each task at once (a zero-cost generation), so the figure is the
queue's own ceiling. The backlog is spread over four backends; workers claim the first. Also
prints the claim statement's plan and time at that depth. Prints the machine and the commit.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine_and_commit  # noqa: E402
from serve_app.store.db import Database, query  # noqa: E402
from serve_app.store.tasks import TaskQueue  # noqa: E402
from tests.support import pg  # noqa: E402

BACKENDS = ("cpu", "trellis", "trellis2", "other")


def fill(url: str, queued: int) -> None:
    """`queued` tasks, round-robin over the backends, inserted in one statement."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            """
            INSERT INTO tasks (id, account_id, backend, options, inputs, max_attempts, created_at)
            SELECT gen_random_uuid(), 'local', (%s::text[])[1 + i %% 4], '{}', '[]', 3,
                   clock_timestamp() - make_interval(secs => %s - i)
            FROM generate_series(1, %s) AS i
            """,
            (list(BACKENDS), queued, queued),
        )
        conn.execute("VACUUM ANALYZE tasks")


def explain_claim(url: str) -> str:
    import psycopg

    sql = query("claim_task")
    # "backends" too, so the bench also runs against older code (claim over a list)
    params = {"backend": "cpu", "backends": ["cpu"], "worker_id": "explain", "lease_seconds": 60}
    with psycopg.connect(url) as conn:  # a transaction, rolled back: the claim is not kept
        rows = conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, params).fetchall()
        conn.rollback()
    return "\n".join(r[0] for r in rows)


def run(url: str, workers: int, seconds: float) -> float:
    done = [0] * workers
    stop = threading.Event()

    def work(i: int) -> None:
        db = Database(url, min_size=1, max_size=2)
        db.open(wait=True)
        queue = TaskQueue(db, lease_seconds=60, backoff_seconds=0)
        try:
            while not stop.is_set():
                claim = queue.claim(f"bench-{i}", ["cpu"])
                if claim is None:
                    break
                queue.succeed(claim, {"files": {}, "preview": {"key": "x"}})
                done[i] += 1
        finally:
            db.close()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    started = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return sum(done) / (time.monotonic() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--queued", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--workers", default="1,2,4,8")
    args = parser.parse_args()
    print(machine_and_commit())
    with tempfile.TemporaryDirectory(prefix="p3d-q-") as tmp:
        admin, server = pg.admin_url(Path(tmp) / "pg")
        pg.make_template(admin)
        print(f"backlog: {args.queued} queued tasks over {len(BACKENDS)} backends")
        print("| workers | claim+finish/s |")
        print("|---|---|")
        for n in [int(w) for w in args.workers.split(",")]:
            clone = pg.clone_database(admin, prefix=f"q{n}")
            url = next(clone)
            fill(url, args.queued)
            if n == 1:
                plan = explain_claim(url)
            print(f"| {n} | {run(url, n, args.seconds):.0f} |", flush=True)
            clone.close()
        print("\nclaim plan at that depth:\n" + plan)
        del server
    return 0


if __name__ == "__main__":
    sys.exit(main())
