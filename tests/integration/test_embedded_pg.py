"""The embedded PostgreSQL `make run` uses when DATABASE_URL is unset (a real pgserver)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from serve_app.embedded_pg import start_embedded_postgres

ROOT = Path(__file__).resolve().parents[2]

HOLD_A_HANDLE = """
import sys, time
from pathlib import Path
from serve_app.embedded_pg import start_embedded_postgres
start_embedded_postgres(Path(sys.argv[1]))
print("holding", flush=True)
time.sleep(600)
"""


def test_the_server_stops_with_its_last_holder_even_after_a_holder_was_killed(
    embedded_run_dir: Path,
) -> None:
    """A CLI command killed while it held the database (SIGKILL: no exit hook) must not keep
    the server alive after `make run`, the last holder, ends."""
    pgdata = embedded_run_dir / "pgdata"
    killed = subprocess.Popen(
        [sys.executable, "-c", HOLD_A_HANDLE, str(pgdata)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert killed.stdout is not None and killed.stdout.readline().strip() == "holding"
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)

    url, server = start_embedded_postgres(pgdata)  # `make run` starting later
    assert url.startswith("postgresql://")
    assert (pgdata / "postmaster.pid").exists()
    server.cleanup()  # `make run` exits
    assert not (pgdata / "postmaster.pid").exists(), "the server outlived its last holder"
