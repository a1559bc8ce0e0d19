"""The S3 artifact store on a real S3-compatible server (SeaweedFS on loopback): files round-trip
and stream, a result made by the worker downloads by its signed link (a redirect to a presigned
URL), and a missing bucket or bad credentials are named by /health and at startup."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trimesh
from fastapi.testclient import TestClient

from serve_app import artifacts
from serve_app.api.app import create_app
from serve_app.artifacts import S3ArtifactStore, open_artifact_store
from serve_app.errors import ArtifactStoreError, NotFound
from serve_app.service import Services
from serve_app.settings import Settings
from tests.integration.test_auth import finished_task, key_for
from tests.support.app import open_services
from tests.support.seaweed import SeaweedS3


@pytest.fixture
def s3_env(seaweed: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> SeaweedS3:
    for name, value in seaweed.env.items():
        monkeypatch.setenv(name, value)
    return seaweed


def test_store_round_trip_stream_and_delete(s3_env: SeaweedS3) -> None:
    bucket = s3_env.new_bucket()
    store = S3ArtifactStore.from_url(f"s3://{bucket}/deploy-a")
    store.check()
    store.put("tasks/t1/attempt-1/model.glb", b"glTF" + b"x" * 100)
    store.put("tasks/t1/attempt-1/preview.png", b"png")
    store.put("tasks/t10/keep.bin", b"other task")
    assert store.get("tasks/t1/attempt-1/model.glb").startswith(b"glTF")
    assert store.exists("tasks/t1/attempt-1/preview.png")
    assert store.size("tasks/t1/attempt-1/model.glb") == 104
    assert not store.exists("tasks/t1/nothing")
    with pytest.raises(NotFound):
        store.get("tasks/t1/nothing")
    with pytest.raises(NotFound):
        list(store.iter_chunks("tasks/t1/nothing"))
    # Keys live under the prefix, so two deployments can share a bucket.
    listed = s3_env.client().list_objects_v2(Bucket=bucket)["Contents"]
    assert all(o["Key"].startswith("deploy-a/") for o in listed)
    store.delete_prefix("tasks/t1")
    assert not store.exists("tasks/t1/attempt-1/model.glb")
    assert store.get("tasks/t10/keep.bin") == b"other task"  # t10 is not under t1/
    with pytest.raises(ArtifactStoreError):
        store.put("../escape", b"x")


def test_large_files_go_in_parts_and_stream_in_chunks(
    s3_env: SeaweedS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small thresholds so the test moves megabytes, not the production 64 MiB.
    monkeypatch.setattr(artifacts, "MULTIPART_BYTES", 6 * 1024 * 1024)
    monkeypatch.setattr(artifacts, "MULTIPART_CHUNK_BYTES", 5 * 1024 * 1024)
    store = S3ArtifactStore.from_url(f"s3://{s3_env.new_bucket()}")
    data = os.urandom(1024 * 1024) * 12
    store.put("tasks/big/model.glb", data)
    head = s3_env.client().head_object(Bucket=store.bucket, Key="tasks/big/model.glb")
    assert head["ContentLength"] == len(data)
    assert "-" in head["ETag"]  # a multipart upload's ETag names its part count
    chunks = list(store.iter_chunks("tasks/big/model.glb"))
    assert len(chunks) >= 12 and max(len(c) for c in chunks) <= artifacts.CHUNK_BYTES
    assert b"".join(chunks) == data


def test_missing_bucket_and_bad_credentials_are_named(
    s3_env: SeaweedS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ArtifactStoreError) as missing:
        S3ArtifactStore.from_url("s3://no-such-bucket-here/x").check()
    assert missing.value.code == "artifact_bucket_missing"
    assert "no-such-bucket-here" in missing.value.message
    bucket = s3_env.new_bucket()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(ArtifactStoreError) as denied:
        S3ArtifactStore.from_url(f"s3://{bucket}").check()
    assert denied.value.code == "artifact_store_credentials"
    assert "AWS_SECRET_ACCESS_KEY" in denied.value.message
    with pytest.raises(ArtifactStoreError) as bad_url:
        S3ArtifactStore.from_url("https://bucket/prefix")
    assert bad_url.value.code == "config_error"


@pytest.fixture
def s3_services(s3_env: SeaweedS3, database_url: str, tmp_path: Path) -> Iterator[Services]:
    settings = Settings(
        database_url=database_url,
        run_dir=tmp_path,
        auth_required=True,
        rate_limit_requests=1000,
        artifact_url=f"s3://{s3_env.new_bucket()}/photo3d",
        health_requires_worker=False,
    )
    with open_services(settings) as services:
        yield services


def test_result_downloads_by_signed_link_from_the_bucket(s3_services: Services) -> None:
    assert isinstance(s3_services.artifacts, S3ArtifactStore)
    with TestClient(create_app(s3_services), raise_server_exceptions=False) as client:
        alice = key_for(s3_services, "alice")
        task_id = finished_task(client, s3_services, alice)
        task = client.get(f"/api/v1/task/{task_id}", headers=alice).json()
        assert task["status"] == "succeeded", task
        glb_link = next(f["url"] for f in task["result"]["files"] if f["format"] == "glb")
        # No Bearer header: the signed link answers with a presigned URL of the bucket ...
        redirect = client.get(glb_link, follow_redirects=False)
        assert redirect.status_code == 307, redirect.text
        presigned = redirect.headers["location"]
        assert presigned.startswith(s3_services.artifacts.endpoint or "")
        assert "X-Amz-Signature=" in presigned
        # ... which anyone may fetch until it expires: the bytes come straight from S3.
        body = httpx.get(presigned)
        assert body.status_code == 200
        mesh = trimesh.load(io.BytesIO(body.content), file_type="glb", force="mesh")
        assert len(mesh.faces) > 100
        assert 'filename="model.glb"' in body.headers["content-disposition"]
        # The preview link and a turntable rendered on first request work the same way.
        for link in (task["result"]["preview_url"], task["result"]["turntable_url"]):
            hop = client.get(link, follow_redirects=False)
            assert hop.status_code == 307
            assert httpx.get(hop.headers["location"]).status_code == 200
        # The Bearer-authenticated route still serves the bytes itself (streamed from S3).
        direct = client.get(f"/api/v1/task/{task_id}/result/glb", headers=alice)
        assert direct.status_code == 200 and direct.content == body.content
        # Deleting the task deletes its objects.
        assert client.delete(f"/api/v1/task/{task_id}", headers=alice).status_code == 204
        assert httpx.get(presigned).status_code == 404


def test_health_names_a_missing_bucket_and_bad_credentials(
    s3_env: SeaweedS3, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(
        database_url=database_url,
        run_dir=tmp_path,
        artifact_url="s3://photo3d-missing-bucket/a",
        health_requires_worker=False,
    )
    with open_services(settings) as services, TestClient(create_app(services)) as client:
        health = client.get("/health")
        assert health.status_code == 503
        assert "photo3d-missing-bucket" in health.json()["artifacts"]
        assert "does not exist" in health.json()["artifacts"]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    bad = settings.model_copy(update={"artifact_url": f"s3://{s3_env.new_bucket()}"})
    with open_services(bad) as services, TestClient(create_app(services)) as client:
        health = client.get("/health")
        assert health.status_code == 503
        assert "denied" in health.json()["artifacts"]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env.env["AWS_SECRET_ACCESS_KEY"])
    good = settings.model_copy(update={"artifact_url": f"s3://{s3_env.new_bucket()}"})
    with open_services(good) as services, TestClient(create_app(services)) as client:
        health = client.get("/health")
        assert health.status_code == 200 and health.json()["artifacts"] == "ok"


def test_serve_refuses_to_start_on_a_missing_bucket(
    s3_env: SeaweedS3, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from serve_app.cli import _artifacts_ready

    settings = Settings(run_dir=tmp_path, artifact_url="s3://photo3d-absent-bucket/x")
    assert not _artifacts_ready(settings)
    err = capsys.readouterr().err
    assert "artifact_bucket_missing" in err and "photo3d-absent-bucket" in err
    assert isinstance(open_artifact_store(settings), S3ArtifactStore)


def test_presigned_urls_name_the_public_endpoint_when_one_is_set(s3_env: SeaweedS3) -> None:
    """The service talks to S3 at its internal address; browsers get links for the public one
    (here the same server under another host name)."""
    public = s3_env.endpoint.replace("127.0.0.1", "localhost")
    bucket = s3_env.new_bucket()
    store = S3ArtifactStore.from_url(f"s3://{bucket}/p", public_endpoint=public)
    store.put("tasks/t/model.glb", b"glTF-public")
    url = store.presigned_url(
        "tasks/t/model.glb", 60, filename="model.glb", media_type="model/gltf-binary", inline=False
    )
    assert url is not None and url.startswith(public + "/")
    response = httpx.get(url)
    assert response.status_code == 200 and response.content == b"glTF-public"
    assert response.headers["content-type"] == "model/gltf-binary"
