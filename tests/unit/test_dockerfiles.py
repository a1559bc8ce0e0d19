"""The two images, checked without Docker: each Dockerfile parses with Docker's own parser
(the `dockerfile` package wraps moby/buildkit's), its base image is the pinned Ray, and every
file it copies from the build context exists and is not excluded by .dockerignore."""

from __future__ import annotations

import fnmatch
import os
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {
    "Dockerfile.cpu": "cpu",  # no CUDA: head, ingress, CPU backend
    "Dockerfile.gpu": "cu128",  # GPU workers
}


def instructions(name: str) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    try:
        import dockerfile
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("the dockerfile package is missing (dev extra)")
        pytest.skip("pip install dockerfile (dev extra)")
    parsed = dockerfile.parse_file(str(ROOT / "cluster" / "docker" / name))
    return [(c.cmd.upper(), tuple(c.flags), tuple(c.value)) for c in parsed]


def ignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` (relative to the repository root) out of the context."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        if pattern.startswith("**/"):
            if any(fnmatch.fnmatch(part, pattern[3:]) for part in parts):
                return True
        elif any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes):
            return True
    return False


def ray_pin() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [m[1] for d in deps if (m := re.fullmatch(r"ray\[[\w,]+\]==([\d.]+)", d))]
    assert len(pins) == 1, "pyproject.toml pins ray exactly once"
    return pins[0]


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_base_image_is_the_pinned_ray(name: str) -> None:
    steps = instructions(name)
    first_from = next(i for i, step in enumerate(steps) if step[0] == "FROM")
    global_args = dict(step[2][0].split("=", 1) for step in steps[:first_from] if step[0] == "ARG")
    last_from = [step for step in steps if step[0] == "FROM"][-1][2][0]
    # A FROM may only use ARGs declared before the first FROM (Docker's scoping rule).
    used = re.findall(r"\$\{?(\w+)\}?", last_from)
    assert set(used) <= set(global_args), f"{name}: FROM uses an ARG not declared globally"
    image = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args[m[1]], last_from)
    assert image == f"rayproject/ray:{ray_pin()}-py311-{DOCKERFILES[name]}"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_copied_files_are_in_the_build_context(name: str) -> None:
    copied = []
    for cmd, flags, value in instructions(name):
        if cmd != "COPY" or any(f.startswith("--from=") for f in flags):
            continue
        for source in value[:-1]:
            copied.append(source)
            assert (ROOT / source).exists(), f"{name}: COPY {source}: no such file"
            assert not ignored(source), f"{name}: COPY {source} is excluded by .dockerignore"
    # What the images need at run time: the package, the Serve config, the jobs, the web viewer.
    assert {"serve_app", "serve_config.yaml", "jobs", "pyproject.toml"} <= set(copied)
    text = (ROOT / "cluster" / "docker" / name).read_text()
    assert "/opt/photo3d/serve_app/static/vendor/model-viewer.min.js" in text


def test_dockerignore_keeps_the_local_state_out() -> None:
    for path in (".venv/bin/python", ".run/pgdata", "node_modules/x", "serve_app/__pycache__/a"):
        assert ignored(path), path
    assert not ignored("serve_app/api/app.py")
