"""Start the Stripe STAND-IN (tests/support/stripe_standin.py: localstripe plus the routes it
lacks) as a subprocess on a free loopback port, for tests."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tests.support.stack import free_port

ROOT = Path(__file__).resolve().parents[2]


def run_standin(log_dir: Path) -> Iterator[str]:
    """Yield the stand-in's base URL while it runs; stop it afterwards."""
    port = free_port()
    log = open(log_dir / "standin.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.stripe_standin", "--port", str(port)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Stripe stand-in did not start (see {log.name})")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
