"""What every bench prints about where it ran: the commit, and the machine with it."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    """The short hash of the checked-out commit."""
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()


def machine_and_commit() -> str:
    """`machine: x86_64, 2 cores; commit abc1234`, the first line of a bench's output."""
    return f"machine: {platform.machine()}, {os.cpu_count()} cores; commit {commit()}"
