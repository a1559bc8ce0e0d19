"""Bulk conversion sources beyond a folder: photos under an S3 prefix (a real SeaweedFS) and a
JSON Lines manifest whose rows are URLs, converted by a real worker on a real PostgreSQL."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from jobs import bulk_convert
from serve_app.service import Services
from serve_app.settings import Settings, get_settings
from tests.integration.test_api_worker import make_worker
from tests.support.images import object_photo
from tests.support.seaweed import SeaweedS3

PHOTO = object_photo(160, seed=41, fmt="JPEG")


class _Photos(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/web.jpg" else 404)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(PHOTO) if self.path == "/web.jpg" else 0))
        self.end_headers()
        if self.path == "/web.jpg":
            self.wfile.write(PHOTO)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def photo_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Photos)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def job_env(
    seaweed: SeaweedS3, settings: Settings, photo_server: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Services]:
    """The job's environment (as a Ray Job gets it from the cluster) and a worker serving it."""
    for name, value in {
        **seaweed.env,
        "DATABASE_URL": str(settings.database_url),
        "PHOTO3D_RUN_DIR": str(settings.run_dir),
        "PHOTO3D_URL_ALLOW_HOSTS": photo_server,
    }.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    services = Services.from_settings(get_settings())
    services.db.open(wait=True)
    worker = make_worker(services)
    worker.start()
    try:
        yield services
    finally:
        worker.stop(timeout=30)
        services.db.close()
        get_settings.cache_clear()


def test_photos_under_an_s3_prefix_become_one_batch(
    job_env: Services, seaweed: SeaweedS3, tmp_path: Path
) -> None:
    bucket = seaweed.new_bucket()
    s3 = seaweed.client()
    s3.put_object(Bucket=bucket, Key="catalogue/shelf/a.jpg", Body=PHOTO)
    s3.put_object(Bucket=bucket, Key="catalogue/shelf/b.png", Body=object_photo(128, seed=42))
    s3.put_object(Bucket=bucket, Key="catalogue/readme.txt", Body=b"not a photo")
    s3.put_object(Bucket=bucket, Key="elsewhere/c.jpg", Body=PHOTO)  # outside the prefix
    out = tmp_path / "out"

    assert bulk_convert.main(["--input", f"s3://{bucket}/catalogue", "--output", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["counts"] == {"succeeded": 2}
    assert sorted(i["name"] for i in report["items"]) == ["shelf__a", "shelf__b"]
    assert (out / "shelf__a.glb").read_bytes()[:4] == b"glTF"
    batch = job_env.batches.get("local", report["batch_id"])
    assert batch.total == 2 and batch.counts["succeeded"] == 2

    # The same command again resumes the same batch and converts nothing twice.
    assert bulk_convert.main(["--input", f"s3://{bucket}/catalogue", "--output", str(out)]) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["batch_id"] == report["batch_id"] and again["counts"] == {"skipped": 2}


def test_a_manifest_of_urls_obeys_the_image_url_rules(
    job_env: Services, photo_server: str, tmp_path: Path
) -> None:
    manifest = tmp_path / "items.jsonl"
    rows = [
        {"photo": f"http://{photo_server}/web.jpg", "id": "sku-1", "options": {"seed": 3}},
        {"photo": f"http://{photo_server}/gone.jpg", "id": "sku-2"},
        {"photo": "http://169.254.169.254/latest/meta-data", "id": "sku-3"},  # not public
    ]
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    assert bulk_convert.main(["--input", str(manifest), "--output", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    by_id = {i["name"]: i for i in report["items"]}
    assert by_id["sku-1"]["status"] == "succeeded"
    assert (out / "sku-1.glb").exists()
    assert by_id["sku-2"]["status"] == "rejected"
    assert by_id["sku-3"]["status"] == "rejected"
    assert by_id["sku-3"]["error"]["code"] != by_id["sku-2"]["error"]["code"]


def test_beside_make_run_without_database_url_it_uses_the_embedded_server(
    embedded_run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's plain-script form: `make run` (no DATABASE_URL) keeps its embedded PostgreSQL
    in the run folder; the job finds that server there, and its outputs keep the item's name."""
    from serve_app.embedded_pg import start_embedded_postgres
    from serve_app.store.migrate import migrate

    url, server = start_embedded_postgres(embedded_run_dir / "pgdata")  # what `make run` starts
    try:
        migrate(url)
        monkeypatch.delenv("DATABASE_URL", raising=False)
        monkeypatch.setenv("PHOTO3D_RUN_DIR", str(embedded_run_dir))
        get_settings.cache_clear()
        services = Services.from_settings(get_settings().model_copy(update={"database_url": url}))
        services.db.open(wait=True)
        worker = make_worker(services)  # make run's generator
        worker.start()
        try:
            photos = tmp_path / "photos"
            photos.mkdir()
            (photos / "mug.jpg").write_bytes(PHOTO)
            out = tmp_path / "out"
            assert bulk_convert.main(["--input", str(photos), "--output", str(out)]) == 0
        finally:
            worker.stop(timeout=30)
            services.db.close()
        report = json.loads((out / "report.json").read_text())
        assert report["counts"] == {"succeeded": 1}
        files = report["items"][0]["files"]
        assert files["glb"] == "mug.glb" and files["mask"] == "mug.mask.png"
        assert (out / "mug.mask.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        get_settings.cache_clear()
        server.cleanup()
