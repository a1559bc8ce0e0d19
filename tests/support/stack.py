"""Start the real stack (`photo3d serve`: PostgreSQL + Ray Serve with both deployments) in a
subprocess for end-to-end and browser tests, and stop it without leaving processes behind."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A port free now; another process may take it before we bind it, so run_stack retries
    with a new one when the server reports it taken."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


PORT_TAKEN = ("address already in use", "errno 98")


@dataclass
class Stack:
    url: str
    database_url: str
    run_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    metrics_port: int = 0  # Ray's metrics export (Prometheus text) on 127.0.0.1

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, **{"timeout": 30, **kwargs})

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-20000:]

    def processes(self, name: str) -> list[psutil.Process]:
        """Processes of THIS stack (the `photo3d serve` process tree: its Ray head and workers)
        whose command line mentions `name`, e.g. "ServeReplica:photo3d:generator-cpu". Never
        machine-wide: other stacks on the machine are not ours to count or kill."""
        found = []
        with contextlib.suppress(psutil.Error):
            for proc in psutil.Process(self.process.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if any(name in part for part in proc.cmdline()):
                        found.append(proc)
        return found

    def wait_for_task(
        self,
        client: httpx.Client,
        task_id: str,
        *,
        timeout: float = 120,
        until: tuple[str, ...] = ("succeeded", "failed", "canceled"),
    ) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body = client.get(f"/api/v1/task/{task_id}").json()
            if body["status"] in until:
                return body
            time.sleep(0.3)
        raise AssertionError(f"task {task_id} did not reach {until}: {body}\n{self.log()}")


def write_config(
    path: Path, extra_backends: dict[str, float], ingress: dict[str, Any] | None = None
) -> Path:
    """serve_config.yaml plus fake backends (name -> CPUs), with CPUs sized for a 2-core CI;
    `ingress` overrides fields of the Ingress deployment (num_replicas, max_ongoing_requests)."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    app = config["applications"][0]
    for deployment in app["deployments"]:
        if deployment["name"] == "Ingress" and ingress:
            deployment.update(ingress)
            deployment["ray_actor_options"]["num_cpus"] = 0.1
    for name, cpus in extra_backends.items():
        app["args"]["backends"].append(name)
        app["deployments"].append(
            {
                "name": f"generator-{name}",
                "num_replicas": 1,
                "ray_actor_options": {"num_cpus": cpus},
            }
        )
    for deployment in app["deployments"]:
        if deployment["name"] == "generator-cpu":
            deployment["ray_actor_options"]["num_cpus"] = 0.25
    path.write_text(yaml.safe_dump(config))
    return path


@contextlib.contextmanager
def run_stack(
    run_dir: Path,
    database_url: str,
    *,
    extra_backends: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 240,
    ingress: dict[str, Any] | None = None,
    serve_args: list[str] | None = None,
    config_path: Path | None = None,
) -> Iterator[Stack]:
    """Run `photo3d serve` until the block ends; fails with the server log if it never starts.
    `serve_args` replace the default `--num-cpus 2`; `config_path` the written test config
    (`ingress` overrides fields of its Ingress deployment). A port taken between choosing and
    binding it is retried with another."""
    run_dir.mkdir(parents=True, exist_ok=True)
    extra = extra_backends or {}
    config = config_path or write_config(
        run_dir / "serve_config.test.yaml", {name: 0.5 for name in extra}, ingress
    )
    for attempt in range(3):
        try:
            stack = _start(run_dir, database_url, config, extra, env, timeout, serve_args)
        except _PortTaken:
            if attempt == 2:
                raise
            continue
        try:
            yield stack
        finally:
            stop_stack(stack.process)
        return


class _PortTaken(Exception):
    pass


def _start(
    run_dir: Path,
    database_url: str,
    config: Path,
    extra: dict[str, str],
    env: dict[str, str] | None,
    timeout: float,
    serve_args: list[str] | None = None,
) -> Stack:
    port = free_port()
    metrics_port = free_port()
    full_env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "PHOTO3D_RUN_DIR": str(run_dir),
        "PHOTO3D_PORT": str(port),
        "PHOTO3D_METRICS_PORT": str(metrics_port),
        "PHOTO3D_SERVE_CONFIG": str(config),
        "PHOTO3D_EXTRA_BACKENDS": ",".join(f"{k}={v}" for k, v in extra.items()),
        # The same deployments on every host: a GPU host would add the TRELLIS backends.
        "PHOTO3D_BACKENDS": ",".join(["cpu", *extra]),
        "PHOTO3D_LEASE_SECONDS": "3",
        "PHOTO3D_HEARTBEAT_SECONDS": "0.5",
        "PHOTO3D_POLL_SECONDS": "1",
        "PHOTO3D_RETRY_BACKOFF_SECONDS": "0",
        "PHOTO3D_WORKER_ALIVE_SECONDS": "5",
        "PYTHONPATH": str(ROOT),
        "RAY_AUTH_MODE": "disabled",
        "PHOTO3D_DASHBOARD_PORT": "0",  # Ray's job server only where a test submits jobs
        **(env or {}),
    }
    log_path = run_dir / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "serve_app.cli", "serve", *(serve_args or ["--num-cpus", "2"])],
            cwd=ROOT,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    stack = Stack(
        f"http://127.0.0.1:{port}", database_url, run_dir, process, log_path, metrics_port
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                if any(taken in stack.log().lower() for taken in PORT_TAKEN):
                    raise _PortTaken(port)
                raise AssertionError(f"photo3d serve exited ({process.returncode}):\n{stack.log()}")
            # Our own server says it runs on this port (not another stack that took it).
            if f"running at {stack.url}" in stack.log():
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{stack.url}/health", timeout=2).status_code == 200:
                        return stack
            if time.monotonic() > deadline:
                raise AssertionError(f"stack not healthy after {timeout}s:\n{stack.log()}")
            time.sleep(0.5)
    except BaseException:
        stop_stack(process)
        raise


def stop_stack(process: subprocess.Popen[bytes]) -> None:
    """Ctrl-C, as a person would; then make sure nothing of the process group survives."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=60)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


FAKE_SLOW = {"fake-slow": "tests.support.fake_backends:SlowFakeBackend"}


def module_stack(pg_admin: str, run_dir: Path, prefix: str) -> Iterator[Stack]:
    """A stack on a fresh clone of the test database, with the CPU and FAKE slow backends:
    the body of a module-scoped `stack` fixture."""
    from tests.support import pg

    for url in pg.clone_database(pg_admin, prefix=prefix):
        with run_stack(run_dir, url, extra_backends=FAKE_SLOW) as running:
            yield running
