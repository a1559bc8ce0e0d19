"""`photo3d generate`: the same backend, locally, with no server and no database."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import trimesh

from tests.support.images import object_photo

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "serve_app.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )


def test_generate_writes_a_textured_glb(tmp_path: Path) -> None:
    photo = tmp_path / "toy.jpg"
    photo.write_bytes(object_photo(fmt="JPEG"))
    result = run_cli("generate", str(photo), "-o", str(tmp_path / "toy.glb"), "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    scene = trimesh.load(io.BytesIO((tmp_path / "toy.glb").read_bytes()), file_type="glb")
    mesh = next(iter(scene.geometry.values()))
    assert len(mesh.faces) > 100 and mesh.visual.uv is not None


def test_generate_other_format_and_clear_errors(tmp_path: Path) -> None:
    photo = tmp_path / "toy.png"
    photo.write_bytes(object_photo())
    ok = run_cli("generate", str(photo), "--format", "stl", "-q", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert trimesh.load(tmp_path / "toy.stl").is_watertight
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    refused = run_cli("generate", str(bad), cwd=tmp_path)
    assert refused.returncode == 2
    assert "unsupported_image_type" in refused.stderr and "Traceback" not in refused.stderr


def test_serve_on_a_cluster_forwards_settings_but_never_secrets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`photo3d serve --address`: replicas on other nodes get the settings with the app, but
    no secret travels in the deployed config (the Serve status and dashboard show it)."""
    from serve_app.cli import build_parser, forward_settings

    monkeypatch.setenv("PHOTO3D_RAY_ADDRESS", "10.0.0.1:6379")
    monkeypatch.setenv("PHOTO3D_ARTIFACT_URL", "s3://bucket/p")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://s3.internal:8333")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3-secret")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "s3-id")
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:pw@db/photo3d")
    monkeypatch.setenv("PHOTO3D_URL_SIGNING_KEY", "k" * 40)
    monkeypatch.setenv("HOME_UNRELATED", "x")
    assert build_parser().parse_args(["serve"]).address == "10.0.0.1:6379"
    config: dict = {
        "applications": [{"name": "a", "runtime_env": {"env_vars": {"PHOTO3D_X": "kept"}}}]
    }
    monkeypatch.setenv("PHOTO3D_X", "from-env")
    left_out = forward_settings(config)
    env = config["applications"][0]["runtime_env"]["env_vars"]
    assert env["PHOTO3D_ARTIFACT_URL"] == "s3://bucket/p"
    assert env["AWS_ENDPOINT_URL"] == "http://s3.internal:8333"
    assert env["PHOTO3D_X"] == "kept"  # what the config sets wins
    assert "HOME_UNRELATED" not in env
    assert left_out == ["PHOTO3D_URL_SIGNING_KEY"]  # named, so the note can say so
    for secret in ("s3-secret", "s3-id", "pw@db", "k" * 40):
        assert secret not in str(config)


def test_generate_debug_dir_writes_the_mask(tmp_path: Path) -> None:
    """`--debug-dir` shows why a model looks wrong: the mask and the segmentation steps."""
    photo = tmp_path / "toy.jpg"
    photo.write_bytes(object_photo(fmt="JPEG"))
    debug = tmp_path / "debug"
    result = run_cli("generate", str(photo), "-q", "--debug-dir", str(debug), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    names = {p.name for p in debug.iterdir()}
    assert {"mask.png", "overlay.png", "backdrop_distance.png", "shadow.png"} <= names
    from PIL import Image

    with Image.open(debug / "mask.png") as mask, Image.open(photo) as original:
        assert mask.size == original.size and mask.mode == "L"


def test_ray_temp_dir_stays_short_enough_for_rays_unix_sockets(tmp_path: Path) -> None:
    """Ray's dashboard modules bind Unix sockets under its temp dir (at most 107 bytes): a deep
    checkout gets a short temp dir of its own instead of `<run dir>/ray`."""
    from serve_app.cli import ray_temp_dir

    assert ray_temp_dir(Path("/srv/p3d/.run")) == Path("/srv/p3d/.run/ray")
    deep = Path("/home/someone/src/github.com/example/photo3d/.run")
    chosen = ray_temp_dir(deep)
    longest_socket = chosen / "session_2026-11-28_08-30-08_380288_3710/sockets/dash_UsageStatsHead"
    assert len(str(longest_socket)) <= 107
    assert chosen == ray_temp_dir(deep) != ray_temp_dir(deep / "other")
