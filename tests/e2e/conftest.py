"""One running stack per e2e module: `photo3d serve` with the CPU backend and a FAKE slow one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import pg
from tests.support.stack import Stack, run_stack


@pytest.fixture(scope="module")
def stack(pg_admin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    run_dir: Path = tmp_path_factory.mktemp("stack")
    for url in pg.clone_database(pg_admin, prefix="e2e"):
        with run_stack(
            run_dir,
            url,
            extra_backends={"fake-slow": "tests.support.fake_backends:SlowFakeBackend"},
        ) as running:
            yield running
