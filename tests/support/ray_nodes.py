"""A real multi-node Ray cluster on this one machine: a head started with `ray start --head` and
more nodes joined with `ray start --address`, each a `--block`ing process group of its own on
127.0.0.1 with explicit free ports and a private temp dir.

Other people run Ray on this machine: nothing here calls `ray stop` (which stops every Ray on
the machine). A node is stopped, or killed as if its machine died, by signalling the process
group started here, and only that one."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from tests.support.stack import free_port

RAY = str(Path(sys.executable).parent / "ray")


@dataclass
class RayNode:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pgid(self) -> int:
        return self.process.pid  # started with start_new_session: it leads its own group

    def owns(self, pid: int) -> bool:
        """Whether a process runs on this node: `ray start` is among its ancestors (the raylet
        starts its workers in process groups of their own)."""
        try:
            return any(p.pid == self.process.pid for p in psutil.Process(pid).parents())
        except psutil.NoSuchProcess:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def kill(self) -> None:
        """SIGKILL every process of this node at once, as when its machine dies: its process
        group and every descendant (workers run in groups of their own)."""
        try:
            descendants = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            descendants = []
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGKILL)
        for child in descendants:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)


def _node_ports() -> list[str]:
    names = (
        "node-manager-port",
        "object-manager-port",
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "runtime-env-agent-port",
        "metrics-export-port",
    )
    return [f"--{name}={free_port()}" for name in names]


def start_node(
    name: str,
    log_dir: Path,
    *,
    head_address: str | None = None,
    temp_dir: Path | None = None,
    num_cpus: float = 1,
    resources: dict[str, float] | None = None,
    env: dict[str, str] | None = None,
) -> tuple[RayNode, str]:
    """Start a head (no head_address) or join one; returns the node and the head's address."""
    args = [RAY, "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    args += _node_ports()
    args += [f"--num-cpus={int(num_cpus)}", f"--resources={json.dumps(resources or {})}"]
    if head_address is None:
        head_address = f"127.0.0.1:{free_port()}"
        args += [
            "--head",
            f"--port={head_address.rsplit(':', 1)[1]}",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-port={free_port()}",
            "--dashboard-host=127.0.0.1",
            "--include-dashboard=false",
            f"--temp-dir={temp_dir}",
        ]
    else:
        args.append(f"--address={head_address}")
    log_path = log_dir / f"ray-{name}.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            args,
            env={**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return RayNode(name, process, log_path), head_address


def wait_for_nodes(
    head_address: str, count: int, nodes: list[RayNode], timeout: float = 120
) -> None:
    """Until the head reports `count` live nodes (asked with `ray status` for this address)."""
    deadline = time.monotonic() + timeout
    while True:
        for node in nodes:
            if node.process.poll() is not None:
                raise AssertionError(f"ray node {node.name} exited:\n{node.log()}")
        status = subprocess.run(
            [RAY, "status", f"--address={head_address}"],
            capture_output=True,
            text=True,
            env={**os.environ, "RAY_AUTH_MODE": "disabled"},
            timeout=60,
        )
        active = status.stdout.split("Pending:", 1)[0].count(" node_")
        if status.returncode == 0 and active >= count:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{count} Ray nodes not up:\n{status.stdout}{status.stderr}")
        time.sleep(2)


@contextlib.contextmanager
def stopping(nodes: list[RayNode]) -> Iterator[list[RayNode]]:
    """Kill every node in `nodes` (also those appended later) when the block ends."""
    try:
        yield nodes
    finally:
        for node in reversed(nodes):
            node.kill()
