"""Watching the real stack: `photo3d serve` with a real Prometheus (Debian's binary) scraping its
Ray metrics port. A few tasks run (one succeeds, one fails, one hangs until the watchdog kills
its replica and then succeeds on the retry, a burst waits in the queue and loses its replica
mid-task, so a stalled lease is recovered), then every Grafana
panel query and every rule expression is evaluated through Prometheus's HTTP API and must
return series; the queue gauges must match the database; no API key may reach any log.

PHOTO3D_SCREENSHOTS=docs/img also saves Prometheus graph pages of the key queries (headless
Chromium via Playwright), the screenshots docs/operations.md shows.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import psutil
import psycopg
import pytest
import yaml

from serve_app.accounts import Accounts
from serve_app.cli import ray_temp_dir
from serve_app.monitoring import start_prometheus
from serve_app.store.db import Database
from tests.support import pg
from tests.support.images import object_photo
from tests.support.stack import FAKE_SLOW, ROOT, Stack, free_port, run_stack

RULES = ROOT / "cluster" / "prometheus" / "rules" / "photo3d.yml"
DASHBOARD = ROOT / "cluster" / "grafana" / "dashboards" / "photo3d.json"
# Grafana's variables, as a 1-second scrape makes them.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "5s", "$__range": "1h"}
ALERT_FORM = re.compile(r"^(?P<signal>.+?)\s*(?:>=|<=|==|!=|>|<)\s*[0-9.eE+-]+$", re.DOTALL)
BACKENDS = {
    **FAKE_SLOW,
    "fake-hang-once": "tests.support.fake_backends:HangOnceFakeBackend",
    "fake-fail": "tests.support.fake_backends:FailingFakeBackend",
}


@dataclass
class Monitored:
    stack: Stack
    prometheus: str  # base URL
    key: str
    account: str

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; the result's series (raises on a query error)."""
        response = httpx.get(f"{self.prometheus}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert body["status"] == "success", f"{expr}: {body}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def value(self, expr: str) -> float:
        series = self.query(expr)
        return float(series[0]["value"][1]) if series else 0.0


def prometheus_or_skip() -> None:
    if shutil.which("prometheus") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the prometheus binary is missing (apt-get install prometheus)")
        pytest.skip("the prometheus binary is not installed (apt-get install prometheus)")


@pytest.fixture(scope="module")
def monitored(pg_admin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Monitored]:
    prometheus_or_skip()
    run_dir = tmp_path_factory.mktemp("mon")  # short: Ray socket paths max 107 bytes
    for url in pg.clone_database(pg_admin, prefix="mon"):
        db = Database(url)
        db.open(wait=True)
        accounts = Accounts(db)
        accounts.create_account("acme", "Acme")
        key, _ = accounts.create_key("acme", "monitoring test")
        db.close()
        env = {
            "PHOTO3D_TASK_TIMEOUT_SECONDS": "30",
            "PHOTO3D_MAX_ATTEMPTS": "2",
            "PHOTO3D_FAKE_SLOW_SECONDS": "5",
            "PHOTO3D_QUEUE_METRICS_SECONDS": "1",
            "PHOTO3D_MAX_ACTIVE_TASKS": "50",
            "RAY_metrics_report_interval_ms": "1000",  # 10 s by default; keeps the test short
        }
        with run_stack(run_dir, url, extra_backends=BACKENDS, env=env) as stack:
            port = free_port()
            process = start_prometheus(
                run_dir / "prometheus",
                f"127.0.0.1:{stack.metrics_port}",
                port=port,
                scrape_interval="1s",
            )
            base = f"http://127.0.0.1:{port}"
            try:
                deadline = time.monotonic() + 60
                while True:
                    with contextlib.suppress(httpx.HTTPError):
                        if httpx.get(f"{base}/-/ready", timeout=2).status_code == 200:
                            break
                    assert process.poll() is None, (
                        run_dir / "prometheus/prometheus.log"
                    ).read_text()
                    assert time.monotonic() < deadline, "Prometheus did not become ready"
                    time.sleep(0.5)
                yield Monitored(stack, base, key, "acme")
            finally:
                stop(process)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=20)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


def submit(client: httpx.Client, backend: str, seed: int, **headers: str) -> str:
    response = client.post(
        "/api/v1/generate",
        data={"seed": str(seed), "backend": backend},
        files={"image": ("p.png", object_photo(seed=seed), "image/png")},
        headers=headers,
    )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def database_queue(url: str) -> dict[tuple[str, str], int]:
    """Tasks per (backend, status) counted straight from the tasks table."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT backend, status::text, count(*) FROM tasks "
            "WHERE status IN ('queued', 'running') GROUP BY 1, 2"
        ).fetchall()
    return {(b, s): int(n) for b, s, n in rows}


def test_request_ids_are_echoed_once_through_serve(monitored: Monitored) -> None:
    with monitored.stack.client() as client:
        given = client.get("/health", headers={"X-Request-ID": "ops-check-1"})
        assert given.headers.get_list("x-request-id") == ["ops-check-1"]
        fresh = client.get("/health")
        assert len(fresh.headers.get_list("x-request-id")) == 1


def test_metrics_endpoint_listens_on_loopback_only(monitored: Monitored) -> None:
    port = monitored.stack.metrics_port
    listening = [
        c.laddr.ip
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    ]
    assert listening and set(listening) <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert "ray_photo3d_" in text  # photo3d's metrics travel next to Ray's own


def test_queue_gauges_match_the_database_after_a_burst(monitored: Monitored) -> None:
    stack = monitored.stack
    with stack.client() as client:
        for seed in range(4):  # one runs (5 s each), the others wait: a backlog that holds
            BURST.append(submit(client, "fake-slow", 100 + seed))
    deadline = time.monotonic() + 60
    last: tuple[Any, Any] = ({}, {})
    while time.monotonic() < deadline:
        truth = database_queue(stack.database_url)
        exported = {
            (s["metric"]["backend"], s["metric"]["status"]): int(float(s["value"][1]))
            for s in monitored.query("max by (backend, status) (photo3d_queue_tasks)")
        }
        nonzero = {k: v for k, v in exported.items() if v}
        if truth.get(("fake-slow", "queued"), 0) > 0 and nonzero == truth:
            # Every deployed backend is exported, idle ones as 0, so "no data" never hides one.
            assert {b for b, _ in exported} >= {"cpu", "fake-slow", "fake-hang-once"}
            # Then the replica running one of them dies: its lease expires and is recovered.
            kill_replica_mid_task(stack, "fake-slow")
            return
        last = (truth, exported)
        time.sleep(0.5)
    raise AssertionError(f"gauges never matched the database with a backlog: {last}")


BURST: list[str] = []


def kill_replica_mid_task(stack: Stack, backend: str) -> None:
    """SIGKILL this stack's generator replica of `backend` (only a descendant of the stack's own
    process) while it is early in a task, so the task's lease is left to expire."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with psycopg.connect(stack.database_url) as conn:
            early = conn.execute(
                "SELECT count(*) FROM tasks WHERE backend = %s AND status = 'running' "
                "AND stage = 'fake-waiting' AND progress < 0.25",
                (backend,),
            ).fetchone()
        if early and early[0]:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"no {backend} task was early in its run")
    for proc in psutil.Process(stack.process.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if any(f"ServeReplica:photo3d:generator-{backend}" in p for p in proc.cmdline()):
                proc.kill()
                return
    raise AssertionError(f"no generator-{backend} replica under this stack")


def test_every_panel_and_rule_returns_series(monitored: Monitored) -> None:
    stack = monitored.stack
    acme = {"Authorization": f"Bearer {monitored.key}"}
    with stack.client() as client, stack.client(headers=acme) as acme_client:
        ok = submit(acme_client, "cpu", 1)
        failing = submit(client, "fake-fail", 2)
        retried = submit(client, "fake-hang-once", 3)
        # A wrong key must not reach the logs either.
        bogus = "p3d_abcdefgh_" + "Z" * 32
        assert (
            client.get("/api/v1/tasks", headers={"Authorization": f"Bearer {bogus}"}).status_code
            == 401
        )
        assert stack.wait_for_task(acme_client, ok, timeout=120)["status"] == "succeeded"
        failed = stack.wait_for_task(client, failing, timeout=120)
        assert failed["status"] == "failed" and failed["error"]["code"] == "fake_unusable_photo"
        # Attempt 1 hangs until the watchdog ends its replica; attempt 2 succeeds.
        done = stack.wait_for_task(client, retried, timeout=240)
        assert done["status"] == "succeeded" and done["attempt"] == 2, done
        # The burst, one of them recovered after its replica was killed, all succeed.
        burst = [stack.wait_for_task(client, task_id, timeout=240) for task_id in BURST]
        assert [t["status"] for t in burst] == ["succeeded"] * len(BURST)
        assert max(t["attempt"] for t in burst) == 2

    queries = panel_queries() + rule_queries()
    deadline = time.monotonic() + 120
    empty: list[str] = []
    while time.monotonic() < deadline:
        empty = [f"{where}: {expr}" for where, expr in queries if not monitored.query(expr)]
        if not empty:
            break
        time.sleep(2)
    assert not empty, "queries without series:\n" + "\n".join(empty)

    # What happened is what the metrics say. Each replica's counters reach Prometheus on its
    # own export and scrape cycle, so the last increments may arrive after every series exists.
    expected = {
        'sum(photo3d_watchdog_kills_total{backend="fake-hang-once"})': 1,
        'sum(photo3d_tasks_finished_total{backend="fake-fail",status="failed",'
        'code="fake_unusable_photo"})': 1,
        'sum(photo3d_task_attempts_total{kind="retry"})': 2,  # the hung one and the killed one
        'sum(photo3d_stalled_recovered_total{outcome="queued"})': 1,
        'sum(photo3d_tasks_finished_total{status="succeeded"})': 2,
        'photo3d:watchdog_kills:increase30m{backend="fake-hang-once"}': 1,
    }
    deadline = time.monotonic() + 120
    short: dict[str, float] = {}
    while time.monotonic() < deadline:
        short = {
            expr: value
            for expr, least in expected.items()
            if (value := monitored.value(expr)) < least
        }
        if not short:
            break
        time.sleep(2)
    assert not short, f"metrics below what happened: {short}"
    assert monitored.value("photo3d:service_up") == 1

    shots = os.environ.get("PHOTO3D_SCREENSHOTS")
    if shots:
        screenshots(monitored, Path(shots))


def test_logs_are_json_with_ids_and_never_carry_a_key(monitored: Monitored) -> None:
    stack = monitored.stack
    with stack.client(headers={"Authorization": f"Bearer {monitored.key}"}) as client:
        task_id = submit(client, "cpu", 7, **{"X-Request-ID": "ops-trace-7"})
        assert stack.wait_for_task(client, task_id)["status"] == "succeeded"
    secret = monitored.key.split("_", 2)[2]  # the 32 characters after p3d_<prefix>_ (may hold "_")
    ray_dir = ray_temp_dir(stack.run_dir)  # <run dir>/ray, or a short one for deep paths
    records: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        files = [stack.log_path, *sorted(ray_dir.glob("session_*/logs/**/*"))]
        records = []
        for path in files:
            if not path.is_file():
                continue
            data = path.read_bytes()
            assert monitored.key.encode() not in data and secret.encode() not in data, path
            assert b"Z" * 32 not in data, path
            records += json_lines(data.decode(errors="replace"))
        about_request = [r for r in records if r.get("request_id") == "ops-trace-7"]
        about_task = [r for r in records if r.get("task_id") == task_id and "attempt" in r]
        if about_request and any("succeeded" in r.get("message", "") for r in about_task):
            break  # the worker's line may land a moment after the API shows the task done
        time.sleep(1)
    queued = [r for r in about_request if r.get("message") == "task queued"]
    assert queued and queued[0]["account_id"] == "acme" and queued[0]["task_id"] == task_id
    assert any(r.get("account_id") == "acme" and r["attempt"] == 1 for r in about_task)
    assert any("succeeded" in r.get("message", "") for r in about_task)


def json_lines(text: str) -> list[dict[str, Any]]:
    """JSON objects of a log: whole lines (Serve's and the workers' files) or the part after
    Ray's `(ServeReplica:... pid=...)` prefix in the driver's output."""
    found = []
    for line in text.splitlines():
        start = line.find("{")
        if start < 0:
            continue
        with contextlib.suppress(ValueError):
            record = json.loads(line[start:])
            if isinstance(record, dict):
                found.append(record)
    return found


def panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in GRAFANA_VARS.items():
                expr = expr.replace(name, value)
            found.append((f"panel {panel['title']!r}", expr))
    assert len(found) >= 20
    return found


def rule_queries() -> list[tuple[str, str]]:
    found = []
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            expr = " ".join(rule["expr"].split())
            if "record" in rule:
                found.append((f"rule {rule['record']}", expr))
                found.append((f"recorded {rule['record']}", rule["record"]))
            else:
                match = ALERT_FORM.match(expr)
                assert match, f"alert {rule['alert']} is not `<signal> <op> <threshold>`"
                found.append((f"alert {rule['alert']} signal", match["signal"]))
    return found


KEY_QUERIES = {
    "traffic": "sum by (route, status) (rate(photo3d_http_requests_total[1m]))",
    "queue-depth": "max by (backend, status) (photo3d_queue_tasks)",
    "failures": "sum by (backend, status, code) "
    '(photo3d_tasks_finished_total{status!="succeeded"})',
    "replicas": "max by (deployment) (photo3d_deployment_replicas)",
}


def screenshots(monitored: Monitored, folder: Path) -> None:
    """Prometheus's own graph page for the key queries, in headless Chromium."""
    from playwright.sync_api import sync_playwright

    folder.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=os.environ.get("PHOTO3D_CHROMIUM", "/usr/bin/chromium"),
            args=["--no-sandbox", "--disable-gpu"],
        )
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        for name, expr in KEY_QUERIES.items():
            params = {"g0.expr": expr, "g0.tab": "0", "g0.range_input": "3m"}
            page.goto(f"{monitored.prometheus}/graph?{urlencode(params)}")
            page.wait_for_selector("canvas, .graph-legend, svg", timeout=15000)
            time.sleep(1.5)
            page.screenshot(path=str(folder / f"prometheus-{name}.png"), full_page=True)
        browser.close()
