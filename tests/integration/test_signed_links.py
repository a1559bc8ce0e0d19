"""Signed download links on the local artifact store, with auth required: every result, preview
and turntable link the API returns works without a Bearer header until it expires, and no
alteration reaches another task, format or account."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from fastapi.testclient import TestClient

from serve_app.downloads import KEY_FILE, load_signing_key
from serve_app.errors import InvalidInput
from serve_app.service import Services
from serve_app.settings import Settings
from tests.integration.test_auth import finished_task, key_for


@pytest.fixture
def services(database_url: str, tmp_path: Path) -> Iterator[Services]:
    from tests.support.app import open_services

    settings = Settings(
        database_url=database_url,
        run_dir=tmp_path,
        auth_required=True,
        rate_limit_requests=1000,
        max_active_tasks=3,
    )
    with open_services(settings) as opened:
        yield opened


def links(task: dict) -> dict[str, str]:
    result = task["result"]
    found = {f["format"]: f["url"] for f in result["files"]}
    return {**found, "preview": result["preview_url"], "turntable": result["turntable_url"]}


def altered(url: str, **changes: str) -> str:
    """The link with some of its parts replaced (path parts task/kind, query parts)."""
    parts = urlsplit(url)
    _, _, _, _, task, kind = parts.path.split("/")
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    task, kind = changes.pop("task", task), changes.pop("kind", kind)
    query.update(changes)
    return f"/api/v1/download/{task}/{kind}?{urlencode(query)}"


def test_links_work_without_a_bearer_header(client: TestClient, services: Services) -> None:
    alice = key_for(services, "alice")
    task_id = finished_task(client, services, alice)
    task = client.get(f"/api/v1/task/{task_id}", headers=alice).json()
    assert task["result"]["links_expire_at"]
    urls = links(task)
    assert {"glb", "preview", "turntable"} <= set(urls)
    glb = client.get(urls["glb"])  # no Authorization header
    assert glb.status_code == 200 and glb.content[:4] == b"glTF"
    assert glb.content == client.get(f"/api/v1/task/{task_id}/result/glb", headers=alice).content
    assert 'filename="model.glb"' in glb.headers["content-disposition"]
    preview = client.get(urls["preview"])
    assert preview.status_code == 200 and preview.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert preview.headers["content-disposition"] == "inline"
    turntable = client.get(urls["turntable"])  # rendered on first request
    assert turntable.status_code == 200 and turntable.content[8:12] == b"WEBP"
    # The listing and the live stream hand out the same kind of links.
    listed = client.get("/api/v1/tasks", headers=alice).json()["tasks"][0]
    assert client.get(links(listed)["glb"]).status_code == 200
    # Without a signature the old routes still need the key.
    assert client.get(f"/api/v1/task/{task_id}/result/glb").status_code == 401


def test_an_altered_link_never_reaches_the_file(client: TestClient, services: Services) -> None:
    alice, bob = key_for(services, "alice"), key_for(services, "bob")
    alice_task = finished_task(client, services, alice)
    bob_task = finished_task(client, services, bob)
    url = links(client.get(f"/api/v1/task/{alice_task}", headers=alice).json())["glb"]
    expires = parse_qs(urlsplit(url).query)["expires"][0]
    for bad in (
        altered(url, task=bob_task),  # another account's task
        altered(url, account="bob"),  # another account
        altered(url, account="bob", task=bob_task),
        altered(url, kind="stl"),  # another format
        altered(url, kind="preview"),
        altered(url, expires=str(int(expires) + 3600)),  # a longer life
        altered(url, signature="A" * 43),
        altered(url, signature=""),
    ):
        response = client.get(bad)
        assert response.status_code in (403, 404), (bad, response.status_code)
        assert response.json()["error"]["code"] in ("invalid_signature", "invalid_request")
        assert not response.content.startswith(b"glTF")
    missing = altered(url, expires="")
    assert client.get(missing).status_code == 422


def test_an_expired_link_answers_410(client: TestClient, services: Services) -> None:
    alice = key_for(services, "alice")
    task_id = finished_task(client, services, alice)
    url = links(client.get(f"/api/v1/task/{task_id}", headers=alice).json())["glb"]
    ttl = services.downloads.ttl_seconds
    services.downloads.clock = lambda: time.time() + ttl + 5
    expired = client.get(url)
    assert expired.status_code == 410
    assert expired.json()["error"]["code"] == "link_expired"
    # A fresh read of the task hands out a working link again.
    fresh = links(client.get(f"/api/v1/task/{task_id}", headers=alice).json())["glb"]
    assert client.get(fresh).status_code == 200


def test_a_deleted_task_link_is_not_found(client: TestClient, services: Services) -> None:
    alice = key_for(services, "alice")
    task_id = finished_task(client, services, alice)
    url = links(client.get(f"/api/v1/task/{task_id}", headers=alice).json())["glb"]
    assert client.delete(f"/api/v1/task/{task_id}", headers=alice).status_code == 204
    assert client.get(url).status_code == 404


def test_signing_key_is_made_once_in_the_run_folder_and_never_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = Settings(run_dir=tmp_path / "run")
    key = load_signing_key(settings)
    path = tmp_path / "run" / KEY_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_signing_key(settings) == key and len(key) >= 32
    assert key.decode() not in caplog.text
    with pytest.raises(InvalidInput, match="PHOTO3D_URL_SIGNING_KEY"):
        load_signing_key(Settings(run_dir=tmp_path / "prod", environment="production"))
    with pytest.raises(InvalidInput, match="at least 32"):
        load_signing_key(Settings(url_signing_key="short"))  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="placeholder"):
        load_signing_key(
            Settings(environment="production", url_signing_key="CHANGE_ME_" + "x" * 32)  # type: ignore[arg-type]
        )
    explicit = Settings(url_signing_key="k" * 40)  # type: ignore[arg-type]
    assert load_signing_key(explicit) == b"k" * 40
    assert "kkkk" not in repr(explicit)
