"""What the service adds around a generation, what an idle stack costs, and how long it takes
to start.

    .venv/bin/python bench/overhead.py [--tasks 30] [--rates 1,5] [--backends fake-zero,cpu]
    .venv/bin/python bench/overhead.py --formats glb,stl,obj   # extra formats asked for
    .venv/bin/python bench/overhead.py --cpu-replicas 2  # a fixed number of CPU generators
    .venv/bin/python bench/overhead.py --after-success-files on_request  # no eager previews
    .venv/bin/python bench/overhead.py --idle 60       # CPU seconds of an idle stack
    .venv/bin/python bench/overhead.py --idle 60 --foreign-rate 5   # ... while another
                                                 # backend (no generator here) gets 5 tasks/s
    .venv/bin/python bench/overhead.py --cold 3        # `photo3d serve` to /health 200
    .venv/bin/python bench/overhead.py --steps         # each step of the worker, in-process
    .venv/bin/python bench/overhead.py --generate 20   # the CPU backend alone: wall and CPU s

Overhead: the real stack (`photo3d serve`: Ray Serve, the Ingress, one generator per backend)
on an embedded PostgreSQL, with the CPU backend and the FAKE zero-cost backend (tests/support/
fake_backends.py: the same small GLB at once, so only the service's own work is left). Tasks are
submitted through the HTTP API at a fixed rate; each task's row gives created_at,
attempt_started_at (the claim), finished_at (succeeded) and the generation's own seconds
(result.timings.generate_s). Overhead = finished - created - generate_s, split into the wait
for a claim (claimed - created) and the worker's own path (finished - claimed - generate_s).
"Rest ready" is how long after `succeeded` the preview and the other formats asked for were all
stored (the row's last update, issue 11); tasks whose rest was still not stored 60 s after the
last one succeeded are counted as "made on request" (the worker's backlog was full).

Idle: CPU seconds used by the stack's own process tree (and by its PostgreSQL) over a window,
after the stack has settled. Cold start: `photo3d serve` with its own embedded PostgreSQL (as
`make run`), from spawn to /health 200; the first run initialises the database, later runs
reuse it, as a second `make run` does. Prints the machine, the commit and the load average.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import psutil
import psycopg
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import commit as bench_commit  # noqa: E402
from tests.support import pg  # noqa: E402
from tests.support.images import object_photo  # noqa: E402
from tests.support.stack import free_port, run_stack, stop_stack, write_config  # noqa: E402

ZERO = {"fake-zero": "tests.support.fake_backends:ZeroCostFakeBackend"}


def header() -> None:
    commit = bench_commit()
    cpu = "unknown cpu"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores ({cpu}); commit {commit}")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)


def fixed_replicas(config: Path, deployment: str, replicas: int) -> None:
    """Run `replicas` replicas of one deployment, without autoscaling."""
    data = yaml.safe_load(config.read_text())
    for entry in data["applications"][0]["deployments"]:
        if entry["name"] == deployment:
            entry.pop("autoscaling_config", None)
            entry["num_replicas"] = replicas
    config.write_text(yaml.safe_dump(data))


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


# --- overhead ------------------------------------------------------------------------------
def submit_at_rate(
    url: str, photo: bytes, backend: str, n: int, rate: float, formats: str = "glb"
) -> list[str]:
    """POST n tasks, one every 1/rate seconds (each in its own thread, so a slow answer does
    not delay the next submission)."""
    options = json.dumps({"backend": backend, "formats": formats.split(",")})

    def post(client: httpx.Client) -> str:
        reply = client.post(
            f"{url}/api/v1/generate",
            files={"image": ("p.jpg", photo, "image/jpeg")},
            data={"options": options},
        )
        reply.raise_for_status()
        return str(reply.json()["id"])

    with httpx.Client(timeout=60) as client, concurrent.futures.ThreadPoolExecutor(8) as pool:
        started = time.monotonic()
        futures = []
        for i in range(n):
            time.sleep(max(0.0, started + i / rate - time.monotonic()))
            futures.append(pool.submit(post, client))
        return [f.result() for f in futures]


def wait_finished(
    database_url: str, ids: list[str], timeout: float, rest_timeout: float = 0
) -> list[dict]:
    """The tasks' rows once all ended; with rest_timeout, also until the preview and every
    format of each succeeded task are stored, or rest_timeout seconds after the last ended."""
    deadline = time.monotonic() + timeout
    rest_deadline: float | None = None
    with psycopg.connect(database_url, autocommit=True) as conn:
        while True:
            rows = conn.execute(
                """
                SELECT id, status, created_at, attempt_started_at, finished_at,
                       (result->'timings'->>'generate_s')::float AS generate_s, updated_at,
                       coalesce((result->'preview'->>'ready')::bool, true)
                       AND NOT EXISTS (SELECT 1 FROM jsonb_each(result->'files') f
                                       WHERE f.value->>'ready' = 'false') AS rest_ready
                FROM tasks WHERE id = ANY(%s::uuid[])
                """,
                ([uuid.UUID(i) for i in ids],),
            ).fetchall()
            done = [r for r in rows if r[1] in ("succeeded", "failed", "canceled")]
            now = time.monotonic()
            if len(done) == len(ids) and rest_deadline is None:
                rest_deadline = now + rest_timeout
            rest = all(r[7] for r in rows if r[1] == "succeeded")
            if (rest_deadline is not None and (rest or now > rest_deadline)) or now > deadline:
                keys = (
                    "id", "status", "created", "claimed", "finished", "generate_s", "updated",
                    "rest_ready",
                )  # fmt: skip
                return [dict(zip(keys, r, strict=True)) for r in rows]
            time.sleep(0.5)


def overhead(args: argparse.Namespace, admin: str, work: Path) -> None:
    photo = object_photo(args.side, seed=3, fmt="JPEG")
    print(
        f"photo: {args.side}² JPEG, {len(photo)} bytes; {args.tasks} tasks per row; "
        f"formats {args.formats}; CPU generator replicas: {args.cpu_replicas or 'as configured'}"
        f"; PHOTO3D_AFTER_SUCCESS_FILES={args.after_success_files}"
    )
    env = {
        "PHOTO3D_MAX_ACTIVE_TASKS": "100000000",
        "PHOTO3D_RATE_LIMIT_REQUESTS": "1000000000",
        "PHOTO3D_AFTER_SUCCESS_FILES": args.after_success_files,
    }
    # Nothing follows success on its own in on_request mode: do not wait for it.
    rest_wait = 60 if args.after_success_files == "eager" else 0
    config = None
    if args.cpu_replicas:
        config = write_config(work / "serve_config.bench.yaml", {name: 0.5 for name in ZERO})
        fixed_replicas(config, "generator-cpu", args.cpu_replicas)
    for url in pg.clone_database(admin, prefix="overhead"):
        with run_stack(work / "s", url, extra_backends=ZERO, env=env, config_path=config) as stack:
            backends = args.backends.split(",")
            for backend in backends:  # one warm-up task each (first imports, first connections)
                wait_finished(url, submit_at_rate(stack.url, photo, backend, 2, 1), 300, rest_wait)
            print(
                "| backend | tasks/s | n | overhead p50 / p99 ms | wait for claim p50 / p99 ms "
                "| worker path p50 / p99 ms | generate_s p50 | rest ready p50 / p99 ms "
                "| made on request | load |"
            )
            print("|---|---|---|---|---|---|---|---|---|---|")
            for backend in backends:
                for rate in [float(r) for r in args.rates.split(",")]:
                    ids = submit_at_rate(stack.url, photo, backend, args.tasks, rate, args.formats)
                    rows = wait_finished(url, ids, 600, rest_wait)
                    ok = [r for r in rows if r["status"] == "succeeded"]
                    total = [
                        ((r["finished"] - r["created"]).total_seconds() - r["generate_s"]) * 1000
                        for r in ok
                    ]
                    wait = [(r["claimed"] - r["created"]).total_seconds() * 1000 for r in ok]
                    path = [
                        ((r["finished"] - r["claimed"]).total_seconds() - r["generate_s"]) * 1000
                        for r in ok
                    ]
                    gen = statistics.median(r["generate_s"] for r in ok) if ok else float("nan")
                    rest = [
                        (r["updated"] - r["finished"]).total_seconds() * 1000
                        for r in ok
                        if r["rest_ready"]
                    ]
                    bad = len(rows) - len(ok)
                    print(
                        f"| {backend} | {rate:g} | {len(ok)}{f' ({bad} not ok)' if bad else ''} "
                        f"| {pct(total, 0.5):.0f} / {pct(total, 0.99):.0f} "
                        f"| {pct(wait, 0.5):.0f} / {pct(wait, 0.99):.0f} "
                        f"| {pct(path, 0.5):.0f} / {pct(path, 0.99):.0f} "
                        f"| {gen:.3f} | "
                        + (f"{pct(rest, 0.5):.0f} / {pct(rest, 0.99):.0f} " if rest else "– ")
                        + f"| {len(ok) - len(rest)} | {os.getloadavg()[0]:.2f} |",
                        flush=True,
                    )


# --- steps --------------------------------------------------------------------------------
def steps(args: argparse.Namespace, admin: str, work: Path) -> None:
    """The worker engine in this process (no Ray, no HTTP), started as a replica starts it, on
    the bench's PostgreSQL: one task at a time, each step timed by wrapping the call that does
    it ("whole attempt" is the claim loop's time per task, from claim to the next claim)."""
    from serve_app import worker as worker_module
    from serve_app.service import Services
    from serve_app.settings import Settings
    from serve_app.worker import Worker
    from tests.support.fake_backends import ZeroCostFakeBackend

    timings: dict[str, list[float]] = {}

    def timed(name: str, fn):  # type: ignore[no-untyped-def]
        def wrapper(*a, **k):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timings.setdefault(name, []).append((time.perf_counter() - t0) * 1000)

        return wrapper

    photo = object_photo(args.side, seed=3, fmt="JPEG")
    for url in pg.clone_database(admin, prefix="steps"):
        settings = Settings(database_url=url, run_dir=work / "steps")
        services = Services.from_settings(settings)
        services.db.open(wait=True)
        backend = ZeroCostFakeBackend(settings)
        backend.load()
        worker = Worker(
            queue=services.queue,
            artifacts=services.artifacts,
            backend=backend,  # type: ignore[arg-type]
            heartbeat_seconds=settings.heartbeat_seconds,
            poll_seconds=settings.poll_seconds,
            task_timeout_seconds=60,
        )
        queue = services.queue
        queue.claim = timed("claim (UPDATE ... SKIP LOCKED)", queue.claim)  # type: ignore[method-assign]
        services.artifacts.get = timed("read the photo", services.artifacts.get)  # type: ignore[method-assign]
        worker_module.load_stored_input = timed("decode the photo", worker_module.load_stored_input)
        worker_module.package_asset = timed("package + store the GLB", worker_module.package_asset)
        queue.succeed = timed("finish (succeeded, triggers)", queue.succeed)  # type: ignore[method-assign]
        worker._process = timed("whole attempt in the claim loop", worker._process)  # type: ignore[method-assign]
        worker._render_preview = timed("preview (after succeeded)", worker._render_preview)  # type: ignore[method-assign]
        worker.start()  # as in a replica: the claim loop and its helper threads
        ends = []
        for _ in range(args.tasks):
            key = f"inputs/{uuid.uuid4().hex}/photo-0.jpg"
            services.artifacts.put(key, photo)
            row, _created = queue.submit(
                task_id=uuid.uuid4(),
                account_id="local",
                backend=backend.name,
                options={"backend": backend.name},
                inputs=[key],
                max_attempts=1,
            )
            while (row := queue.get(row["id"], "local")) and row["status"] != "succeeded":
                time.sleep(0.002)
            generated = row["result"]["timings"]["generate_s"]
            ends.append((row["finished_at"] - row["created_at"]).total_seconds() - generated)
            # One task at a time: wait for its preview too, so steps do not overlap.
            while not (queue.get(row["id"], "local") or {})["result"]["preview"].get("ready"):
                time.sleep(0.01)
        worker.stop(timeout=10)
        timings["submit -> succeeded, minus generation"] = [e * 1000 for e in ends]
        services.db.close()
    print(f"{args.tasks} tasks, one at a time, FAKE zero-cost backend, {args.side}² JPEG")
    print("| step | p50 ms | p99 ms |")
    print("|---|---|---|")
    for name, values in timings.items():
        print(f"| {name} | {pct(values, 0.5):.1f} | {pct(values, 0.99):.1f} |")


# --- the CPU backend alone ------------------------------------------------------------------
def generate_cost(args: argparse.Namespace) -> None:
    """The CPU backend's generate() on the bench's photo in this process: wall seconds and the
    CPU seconds it uses (all its threads), which bound how many tasks a second the cores allow."""
    from PIL import Image

    from serve_app.backends import create_backend
    from serve_app.backends.base import GenerationOptions
    from serve_app.settings import Settings

    backend = create_backend("cpu", Settings())
    backend.load()
    image = Image.open(io.BytesIO(object_photo(args.side, seed=3, fmt="JPEG")))
    image.load()
    options = GenerationOptions.model_validate({"backend": "cpu"})
    walls, cpus = [], []
    for i in range(args.generate + 2):
        cpu0, wall0 = time.process_time(), time.perf_counter()
        backend.generate([image], options, lambda fraction, stage: None)
        if i >= 2:  # the first two warm up (imports, caches)
            walls.append(time.perf_counter() - wall0)
            cpus.append(time.process_time() - cpu0)
    print(f"CPU backend, {args.side}² JPEG, {args.generate} runs after 2 warm-up runs")
    print("| wall s p50 / p99 | CPU s p50 / p99 | tasks/s the cores allow (cores / CPU s p50) |")
    print("|---|---|---|")
    print(
        f"| {pct(walls, 0.5):.3f} / {pct(walls, 0.99):.3f} "
        f"| {pct(cpus, 0.5):.3f} / {pct(cpus, 0.99):.3f} "
        f"| {(os.cpu_count() or 1) / pct(cpus, 0.5):.1f} |"
    )
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


# --- idle ----------------------------------------------------------------------------------
def cpu_seconds(procs: list[psutil.Process]) -> dict[int, float]:
    out = {}
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            out[proc.pid] = t.user + t.system
    return out


def tree(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    return []


def postgres_pid(server: object) -> int | None:
    """The postmaster of the bench's embedded PostgreSQL (from its postmaster.pid)."""
    pgdata = getattr(server, "pgdata", None)
    if pgdata is None:
        return None
    return int((Path(pgdata) / "postmaster.pid").read_text().split()[0])


# run_stack's short test timings, back to the service's defaults for the idle figure.
DEFAULT_TIMINGS = (
    "lease_seconds",
    "heartbeat_seconds",
    "poll_seconds",
    "retry_backoff_seconds",
    "worker_alive_seconds",
)


FOREIGN = "other"  # a backend no generator of the stack runs


def queue_foreign(url: str, seconds: float, rate: float) -> int:
    """Sleep `seconds`; with a rate, meanwhile INSERT that many tasks a second for a backend
    none of the stack's generators runs (each INSERT sends the NOTIFY every worker listens to).
    The inserts run in this process, outside the stack's processes."""
    if rate <= 0:
        time.sleep(seconds)
        return 0
    count = 0
    started = time.monotonic()
    with psycopg.connect(url, autocommit=True) as conn:
        while (now := time.monotonic()) < started + seconds:
            time.sleep(max(0.0, started + count / rate - now))
            conn.execute(
                "INSERT INTO tasks (id, account_id, backend, options, inputs, max_attempts) "
                "VALUES (gen_random_uuid(), 'local', %s, '{}', '[]', 1)",
                (FOREIGN,),
            )
            count += 1
    return count


def idle(args: argparse.Namespace, admin: str, server: object, work: Path) -> None:
    from serve_app.settings import Settings

    env = {f"PHOTO3D_{k.upper()}": str(Settings.model_fields[k].default) for k in DEFAULT_TIMINGS}
    for url in pg.clone_database(admin, prefix="idle"):
        with run_stack(work / "i", url, extra_backends=ZERO, env=env) as stack:
            time.sleep(args.settle)
            pg_pid = postgres_pid(server)
            parts = {"stack": stack.process.pid, "postgres": pg_pid}
            before = {name: cpu_seconds(tree(pid)) for name, pid in parts.items() if pid}
            inserted = queue_foreign(url, args.idle, args.foreign_rate)
            after = {name: cpu_seconds(tree(pid)) for name, pid in parts.items() if pid}
            print(f"idle window {args.idle:g} s after {args.settle:g} s settling", end="")
            print(
                f"; {inserted} tasks queued for backend {FOREIGN!r} (no generator) meanwhile"
                if inserted
                else ""
            )
            print("| processes | count | CPU s in window | CPU % of one core |")
            print("|---|---|---|---|")
            for name in after:
                used = sum(t - before[name].get(p, 0.0) for p, t in after[name].items())
                print(
                    f"| {name} | {len(after[name])} | {used:.2f} | {100 * used / args.idle:.1f} |"
                )
            print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
            # The biggest users in the stack, by command line.
            top = sorted(
                ((t - before["stack"].get(p, 0.0), p) for p, t in after["stack"].items()),
                reverse=True,
            )[:8]
            for used, pid in top:
                with contextlib.suppress(psutil.Error):
                    name = " ".join(psutil.Process(pid).cmdline())[:90]
                    print(f"  {used:6.2f} s  {name}")


# --- cold start ----------------------------------------------------------------------------
def cold(args: argparse.Namespace, work: Path) -> None:
    run_dir = work / "cold"
    print("| run | database | spawn -> /health 200 s |")
    print("|---|---|---|")
    times = []
    for i in range(args.cold):
        port = free_port()
        env = {
            **{k: v for k, v in os.environ.items() if k not in ("DATABASE_URL",)},
            "PHOTO3D_RUN_DIR": str(run_dir),
            "PHOTO3D_PORT": str(port),
            "PHOTO3D_METRICS_PORT": str(free_port()),
            "PHOTO3D_DASHBOARD_PORT": str(free_port()),
            "PYTHONPATH": str(ROOT),
        }
        log = (work / f"cold-{i}.log").open("wb")
        started = time.monotonic()
        process = subprocess.Popen(
            [sys.executable, "-m", "serve_app.cli", "serve"],  # `photo3d serve` of this tree
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        took = None
        try:
            while time.monotonic() - started < 180 and process.poll() is None:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                        took = time.monotonic() - started
                        break
                time.sleep(0.1)
        finally:
            stop_stack(process)
            log.close()
        database = "initialised" if i == 0 else "reused"
        print(f"| {i + 1} | {database} | {took:.1f} |" if took else f"| {i + 1} | failed |")
        if took and i > 0:
            times.append(took)
    if times:
        print(f"reused database: median {statistics.median(times):.1f} s, max {max(times):.1f} s")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tasks", type=int, default=30, help="tasks per backend and rate")
    parser.add_argument("--rates", default="1,5", help="tasks per second")
    parser.add_argument("--backends", default="fake-zero,cpu")
    parser.add_argument("--formats", default="glb", help="formats each task asks for")
    parser.add_argument(
        "--cpu-replicas", type=int, default=0, help="fixed CPU generator replicas (0: config's)"
    )
    parser.add_argument("--side", type=int, default=256, help="photo side in pixels")
    parser.add_argument("--idle", type=float, default=0, help="measure idle CPU over N s")
    parser.add_argument("--settle", type=float, default=20, help="seconds before the idle window")
    parser.add_argument(
        "--foreign-rate", type=float, default=0, help="tasks/s for another backend while idle"
    )
    parser.add_argument("--cold", type=int, default=0, help="measure N cold starts")
    parser.add_argument("--steps", action="store_true", help="time each step of the worker")
    parser.add_argument("--after-success-files", default="eager", choices=["eager", "on_request"])
    parser.add_argument("--generate", type=int, default=0, help="time the CPU backend N times")
    args = parser.parse_args()
    header()
    if args.generate:
        generate_cost(args)
        return 0
    with tempfile.TemporaryDirectory(prefix="p3d-overhead-") as tmp:
        work = Path(tmp)
        if args.cold:
            cold(args, work)
            return 0
        admin, server = pg.admin_url(work / "pg")
        pg.make_template(admin)
        if args.steps:
            steps(args, admin, work)
        elif args.idle:
            idle(args, admin, server, work)
        else:
            overhead(args, admin, work)
        del server
    return 0


if __name__ == "__main__":
    sys.exit(main())
