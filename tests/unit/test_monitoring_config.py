"""Prometheus rules, scrape configs and the Grafana dashboard: valid for Prometheus's own
checker, the alerts fire on the histories they are written for, and every panel names only
metrics the service defines (or Ray's own)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from serve_app import metrics
from serve_app.monitoring import prometheus_config

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "cluster" / "prometheus"
DASHBOARD = ROOT / "cluster" / "grafana" / "dashboards" / "photo3d.json"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing (apt-get install prometheus)")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return found


def run(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_rules_pass_promtool_check() -> None:
    out = run(promtool(), "check", "rules", *map(str, sorted((PROM / "rules").glob("*.yml"))))
    assert "SUCCESS" in out


@pytest.mark.parametrize("name", ["prometheus.yml", "prometheus.cluster.yml"])
def test_scrape_configs_pass_promtool_check(name: str) -> None:
    run(promtool(), "check", "config", str(PROM / name))


def test_alerts_fire_on_the_histories_they_are_written_for() -> None:
    run(promtool(), "test", "rules", str(PROM / "tests" / "photo3d_test.yml"))


def alert_rules() -> list[dict]:
    groups = yaml.safe_load((PROM / "rules" / "photo3d.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_every_alert_waits_and_has_a_runbook_section() -> None:
    operations = (ROOT / "docs" / "operations.md").read_text().lower()
    names = {rule["alert"] for rule in alert_rules()}
    assert {
        "Photo3dDown",
        "Photo3dHigh5xxRatio",
        "Photo3dQueueWaitHigh",
        "Photo3dOldestQueuedTooOld",
        "Photo3dBacklogWithoutReplica",
        "Photo3dRepeatedWatchdogKills",
        "Photo3dNoWorker",
    } <= names
    for rule in alert_rules():
        assert rule.get("for"), rule["alert"]
        anchor = rule["annotations"]["runbook"].split("#", 1)[1]
        assert anchor == rule["alert"].lower()
        assert f"### {rule['alert'].lower()}" in operations, f"no runbook for {rule['alert']}"


def test_the_local_config_points_at_the_stack_and_keeps_the_renaming() -> None:
    config = prometheus_config("127.0.0.1:18080", scrape_interval="2s")
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "photo3d")
    assert job["static_configs"] == [{"targets": ["127.0.0.1:18080"]}]
    assert any(r.get("replacement") == "$1" for r in job["metric_relabel_configs"])
    assert all(Path(p).is_absolute() for p in config["rule_files"])


def dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def test_dashboard_panels_use_only_defined_metrics() -> None:
    defined = {spec.name for spec in metrics.SPECS}
    recorded = {
        rule["record"]
        for group in yaml.safe_load((PROM / "rules" / "photo3d.yml").read_text())["groups"]
        for rule in group["rules"]
        if "record" in rule
    }
    used = set()
    for expr in dashboard_exprs():
        used |= set(re.findall(r"\b(photo3d[a-z0-9_:]*)", expr))
    for name in used:
        base = re.sub(r"_(total|bucket|sum|count)$", "", name)
        assert base in defined or name in recorded, f"{name} is neither a metric nor a rule"
    # The list: traffic, latency, queue, throughput, failures, replicas, GPU, credits.
    text = DASHBOARD.read_text()
    for needle in (
        "photo3d_http_requests_total",
        "photo3d_http_request_seconds_bucket",
        "photo3d_queue_tasks",
        "photo3d_task_queue_wait_seconds_bucket",
        "photo3d_tasks_finished_total",
        "photo3d_deployment_replicas",
        "ray_node_gpus_utilization",
        "ray_node_gram_used",
        "photo3d_credits_charged_total",
    ):
        assert needle in text


def test_metrics_are_no_ops_outside_ray() -> None:
    if metrics.ray_available():
        pytest.skip("Ray is running in this test process")
    # The CLI and unit tests call the helpers without Ray: nothing raises, nothing is created.
    metrics.http_request("/x", "GET", 200, 0.01)
    metrics.task_finished("cpu", "failed", "backend_error")
    metrics.queue_tasks("cpu", "queued", 3)
    metrics.credits_charged("cpu", 1.5)
    metrics.webhook_delivery("delivered")
    assert metrics._metrics == {}


def test_serve_refuses_a_busy_metrics_port_and_keeps_ray_on_loopback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import socket

    from serve_app.cli import pin_metrics_export
    from serve_app.settings import Settings

    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit, match=f"port {port} .* PHOTO3D_METRICS_PORT"):
            pin_metrics_export(Settings(metrics_port=port))
    assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"  # Ray's one-machine mode
    assert pin_metrics_export(Settings(metrics_port=port)) == f"http://127.0.0.1:{port}/metrics"
