"""Prometheus next to a local stack (`make run MONITORING=1`, and the monitoring tests): the
Debian `prometheus` binary, on loopback, with cluster/prometheus's scrape config and rules
pointed at this stack's Ray metrics port."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

PROMETHEUS_DIR = Path(__file__).resolve().parents[1] / "cluster" / "prometheus"


class MonitoringUnavailable(RuntimeError):
    """Prometheus cannot be started here (binary or config missing); the message says why."""


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        raise MonitoringUnavailable(
            "the prometheus binary is not installed (Debian/Ubuntu: apt-get install prometheus); "
            "the stack runs without it"
        )
    return found


def prometheus_config(
    metrics_target: str, *, scrape_interval: str = "15s", config_dir: Path = PROMETHEUS_DIR
) -> dict[str, Any]:
    """cluster/prometheus/prometheus.yml with its target set to `metrics_target` (host:port)
    and its rule files made absolute."""
    source = config_dir / "prometheus.yml"
    if not source.is_file():
        raise MonitoringUnavailable(f"{source} is missing (run from a photo3d checkout)")
    config: dict[str, Any] = yaml.safe_load(source.read_text())
    config["global"]["scrape_interval"] = scrape_interval
    config["global"]["evaluation_interval"] = scrape_interval
    config["rule_files"] = [str(config_dir / pattern) for pattern in config["rule_files"]]
    for job in config["scrape_configs"]:
        if job["job_name"] == "photo3d":
            job["static_configs"] = [{"targets": [metrics_target]}]
    return config


def start_prometheus(
    data_dir: Path,
    metrics_target: str,
    *,
    port: int,
    scrape_interval: str = "15s",
    log_path: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start Prometheus on 127.0.0.1:`port`, its data and config under `data_dir`."""
    binary = prometheus_binary()
    data_dir.mkdir(parents=True, exist_ok=True)
    config_path = data_dir / "prometheus.yml"
    config_path.write_text(
        yaml.safe_dump(prometheus_config(metrics_target, scrape_interval=scrape_interval))
    )
    out = (log_path or data_dir / "prometheus.log").open("ab")
    return subprocess.Popen(
        [
            binary,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={data_dir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=7d",
        ],
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
