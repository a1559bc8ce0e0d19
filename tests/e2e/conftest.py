"""One running stack per e2e module: `photo3d serve` with the CPU backend and a FAKE slow one."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.stack import Stack, module_stack


@pytest.fixture(scope="module")
def stack(pg_admin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from module_stack(pg_admin, tmp_path_factory.mktemp("stack"), "e2e")
