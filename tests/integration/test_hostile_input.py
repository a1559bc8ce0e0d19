"""Hostile and malformed input, generated here: each gets the right 4xx with an error code, no
5xx, nothing is stored, and the server keeps serving. Runs the real app on a real PostgreSQL."""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from serve_app.images import load_stored_input
from serve_app.service import Services
from serve_app.settings import Settings
from tests.support.app import open_services
from tests.support.images import object_photo

MAX_BYTES = 2_000_000


def encode(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a huge size with one tiny compressed IDAT: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * (width + 1) * 8, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "blue", "green")]
    out = io.BytesIO()
    frames[0].save(out, format=fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)
    return out.getvalue()


JPEG = object_photo(fmt="JPEG")
PNG = object_photo()
WEBP = object_photo(fmt="WEBP")

# (name, multipart file bytes, expected status, expected code)
FILE_CASES: list[tuple[str, bytes, int, str]] = [
    ("zero-byte", b"", 422, "empty_image"),
    ("truncated-jpeg", JPEG[: len(JPEG) // 3], 422, "corrupt_image"),
    ("truncated-png", PNG[:60], 422, "corrupt_image"),
    ("truncated-webp", WEBP[:40], 422, "corrupt_image"),
    ("png-magic-garbage", b"\x89PNG\r\n\x1a\n" + b"\x13" * 500, 422, "corrupt_image"),
    (
        "jpeg-magic-garbage",
        b"\xff\xd8\xff\xe0" + b"\x00\x10JFIF" + b"\xaa" * 500,
        422,
        "corrupt_image",
    ),
    ("webp-magic-garbage", b"RIFF\x00\x01\x00\x00WEBPVP8 " + b"\x01" * 300, 422, "corrupt_image"),
    ("text", b"hello, I am not a photo", 415, "unsupported_image_type"),
    ("gif", encode(Image.new("RGB", (32, 32)), "GIF"), 415, "unsupported_image_type"),
    ("animated-gif", animated("GIF"), 415, "unsupported_image_type"),
    ("bmp", encode(Image.new("RGB", (32, 32)), "BMP"), 415, "unsupported_image_type"),
    ("tiff", encode(Image.new("RGB", (32, 32)), "TIFF"), 415, "unsupported_image_type"),
    ("ico", encode(Image.new("RGB", (32, 32)), "ICO"), 415, "unsupported_image_type"),
    (
        "svg",
        b'<svg xmlns="http://www.w3.org/2000/svg" width="9e9" height="9e9"/>',
        415,
        "unsupported_image_type",
    ),
    (
        # HEIC and AVIF are accepted photo types (#15); a header with no image is corrupt.
        "heic",
        b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\0" * 64,
        422,
        "corrupt_image",
    ),
    (
        "avif",
        b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf" + b"\0" * 64,
        422,
        "corrupt_image",
    ),
    ("pdf", b"%PDF-1.7\n1 0 obj<<>>endobj\n", 415, "unsupported_image_type"),
    ("zip", b"PK\x03\x04" + b"\0" * 100, 415, "unsupported_image_type"),
    ("html", b"<html><script>alert(1)</script></html>", 415, "unsupported_image_type"),
    ("elf", b"\x7fELF\x02\x01\x01" + b"\0" * 100, 415, "unsupported_image_type"),
    ("psd", b"8BPS\x00\x01" + b"\0" * 100, 415, "unsupported_image_type"),
    ("bomb-20000x20000", png_header_only(20000, 20000), 413, "image_too_many_pixels"),
    ("bomb-65535x65535", png_header_only(65535, 65535), 413, "image_too_many_pixels"),
    ("too-wide-9000x20", encode(Image.new("L", (9000, 20)), "PNG"), 413, "image_too_many_pixels"),
    ("one-pixel", encode(Image.new("RGB", (1, 1)), "PNG"), 422, "image_too_small"),
    ("thin-2000x3", encode(Image.new("RGB", (2000, 3)), "PNG"), 422, "image_too_small"),
    ("animated-webp", animated("WEBP"), 422, "animated_image"),
    ("animated-png", animated("PNG"), 422, "animated_image"),
    ("too-many-bytes", b"\xff\xd8\xff" + b"\0" * (MAX_BYTES + 10), 413, "image_too_large"),
]

# Valid but unusual photos: accepted and normalised (not every odd file is an attack).
ACCEPTED_FILES: list[tuple[str, bytes]] = [
    ("cmyk-jpeg", encode(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG")),
    ("16-bit-png", encode(Image.new("I;16", (64, 64), 30000), "PNG")),
    ("palette-png", encode(Image.new("RGB", (64, 64), "red").convert("P"), "PNG")),
    ("grey-alpha-png", encode(Image.new("LA", (64, 64), (128, 200)), "PNG")),
    (
        "exif-rotated",
        encode(
            Image.new("RGB", (80, 40)),
            "JPEG",
            exif=(lambda e: (e.__setitem__(0x0112, 8), e)[1])(Image.Exif()),
        ),
    ),
    (
        "exif-bogus-orientation",
        encode(
            Image.new("RGB", (80, 40)),
            "JPEG",
            exif=(lambda e: (e.__setitem__(0x0112, 99), e)[1])(Image.Exif()),
        ),
    ),
]

B64 = base64.b64encode(PNG).decode()

# (name, JSON body, expected status, expected code)
JSON_CASES: list[tuple[str, Any, int, str]] = [
    ("broken-base64", {"image": "!!!not base64!!!"}, 422, "invalid_base64"),
    (
        "base64-of-text",
        {"image": base64.b64encode(b"hello there").decode()},
        415,
        "unsupported_image_type",
    ),
    ("base64-bad-padding", {"image": B64[:-3] + "=A="}, 422, "invalid_base64"),
    ("data-uri-text", {"image": "data:text/plain;base64,aGVsbG8="}, 415, "unsupported_image_type"),
    (
        "data-uri-svg",
        {"image": "data:image/svg+xml;base64,PHN2Zy8+"},
        415,
        "unsupported_image_type",
    ),
    ("data-uri-gif", {"image": "data:image/gif;base64,R0lGODlh"}, 415, "unsupported_image_type"),
    ("data-uri-not-base64", {"image": "data:image/png,rawbytes"}, 422, "invalid_data_uri"),
    ("data-uri-empty", {"image": "data:image/png;base64,"}, 422, "empty_image"),
    (
        "data-uri-lies-about-type",
        {"image": "data:image/png;base64," + base64.b64encode(b"GIF89a" + b"\0" * 50).decode()},
        415,
        "unsupported_image_type",
    ),
    ("image-number", {"image": 12345}, 422, "invalid_base64"),
    ("image-object", {"image": {"$ne": None}}, 422, "invalid_base64"),
    ("image-null", {"image": None}, 422, "invalid_base64"),
    ("images-string", {"images": "abc"}, 422, "missing_image"),
    ("images-empty", {"images": []}, 422, "missing_image"),
    ("images-too-many", {"images": [B64] * 9}, 422, "too_many_images"),
    ("no-image", {"seed": 1}, 422, "missing_image"),
    ("unknown-option", {"image": B64, "evil": "1"}, 422, "invalid_option"),
    ("unknown-nested-option", {"image": B64, "options": {"__class__": "x"}}, 422, "invalid_option"),
    ("options-not-object", {"image": B64, "options": "seed=1"}, 422, "invalid_options"),
    ("seed-negative", {"image": B64, "seed": -1}, 422, "invalid_option"),
    ("seed-huge", {"image": B64, "seed": 2**80}, 422, "invalid_option"),
    ("face-limit-text", {"image": B64, "face_limit": "lots"}, 422, "invalid_option"),
    ("face-limit-tiny", {"image": B64, "face_limit": 3}, 422, "invalid_option"),
    ("texture-size-odd", {"image": B64, "texture_size": 333}, 422, "invalid_option"),
    ("formats-unknown", {"image": B64, "formats": ["fbx"]}, 422, "invalid_option"),
    ("formats-path", {"image": B64, "formats": ["../../etc/passwd"]}, 422, "invalid_option"),
    ("formats-empty", {"image": B64, "formats": []}, 422, "invalid_option"),
    ("backend-unknown", {"image": B64, "backend": "nope"}, 422, "unknown_backend"),
    (
        "backend-sqlish",
        {"image": B64, "backend": "cpu'; DROP TABLE tasks;--"},
        422,
        "unknown_backend",
    ),
    ("resolution-odd", {"image": B64, "resolution": 777}, 422, "invalid_option"),
    ("guidance-nan", {"image": B64, "guidance": float("nan")}, 422, "invalid_option"),
    ("guidance-inf", {"image": B64, "guidance": float("inf")}, 422, "invalid_option"),
    ("steps-zero", {"image": B64, "steps": 0}, 422, "invalid_option"),
    ("remove-bg-maybe", {"image": B64, "remove_background": "maybe"}, 422, "invalid_option"),
    (
        "image-url-and-image",
        {"image": B64, "image_url": "https://example.com/a.png"},
        422,
        "conflicting_inputs",
    ),
    ("image-url-file", {"image_url": "file:///etc/passwd"}, 422, "invalid_image_url"),
    ("image-url-gopher", {"image_url": "gopher://127.0.0.1:25/"}, 422, "invalid_image_url"),
    (
        "image-url-credentials",
        {"image_url": "http://user:pw@203.0.113.9/a.png"},
        422,
        "invalid_image_url",
    ),
    ("image-url-loopback", {"image_url": "http://127.0.0.2:5432/"}, 422, "forbidden_image_url"),
    ("image-url-localhost", {"image_url": "http://localhost/"}, 422, "forbidden_image_url"),
    ("image-url-decimal-loopback", {"image_url": "http://2130706433/"}, 422, "forbidden_image_url"),
    ("image-url-ipv6-loopback", {"image_url": "http://[::1]/"}, 422, "forbidden_image_url"),
    (
        "image-url-mapped-loopback",
        {"image_url": "http://[::ffff:127.0.0.1]/"},
        422,
        "forbidden_image_url",
    ),
    (
        "image-url-metadata",
        {"image_url": "http://169.254.169.254/latest/meta-data/"},
        422,
        "forbidden_image_url",
    ),
    ("image-url-private-10", {"image_url": "http://10.0.0.1/a.png"}, 422, "forbidden_image_url"),
    (
        "image-url-private-192",
        {"image_url": "https://192.168.1.1/a.png"},
        422,
        "forbidden_image_url",
    ),
    ("image-url-unspecified", {"image_url": "http://0.0.0.0:8000/"}, 422, "forbidden_image_url"),
    ("image-url-huge", {"image_url": "http://a.example/" + "a" * 3000}, 422, "invalid_image_url"),
    ("image-url-bad-port", {"image_url": "http://203.0.113.9:99999/"}, 422, "invalid_image_url"),
]

# (name, raw body, content type, expected status, expected code)
RAW_CASES: list[tuple[str, bytes, str | None, int, str]] = [
    ("invalid-json", b"{not json", "application/json", 422, "invalid_json"),
    ("json-array", b"[1, 2, 3]", "application/json", 422, "invalid_json"),
    ("json-null", b"null", "application/json", 422, "invalid_json"),
    ("json-deep-nesting", b"[" * 100000 + b"]" * 100000, "application/json", 422, "invalid_json"),
    ("json-not-utf8", b'{"image": "\xff\xfe"}', "application/json", 422, "invalid_json"),
    (
        "json-huge",
        b'{"image": "' + b"A" * (MAX_BYTES * 8 * 4 // 3 + 200_000) + b'"}',
        "application/json",
        413,
        "request_too_large",
    ),
    ("text-plain", b"image=abc", "text/plain", 415, "unsupported_content_type"),
    ("no-content-type", b"abc", None, 415, "unsupported_content_type"),
    ("octet-stream", PNG, "application/octet-stream", 415, "unsupported_content_type"),
    (
        "xml",
        b"<?xml version='1.0'?><!DOCTYPE x [<!ENTITY a 'b'>]><x>&a;</x>",
        "application/xml",
        415,
        "unsupported_content_type",
    ),
    (
        "form-urlencoded",
        b"image=" + B64.encode()[:100],
        "application/x-www-form-urlencoded",
        415,
        "unsupported_content_type",
    ),
    ("multipart-no-boundary", b"--x\r\n\r\n", "multipart/form-data", 400, "bad_request"),
]


@pytest.fixture
def services(database_url: str, tmp_path: Path, photo_server: str) -> Iterator[Services]:
    settings = Settings(
        database_url=database_url,
        run_dir=tmp_path,
        max_upload_bytes=MAX_BYTES,
        max_image_pixels=40_000_000,
        max_image_side=8192,
        url_fetch_timeout_seconds=2,
        # The loopback photo server, by host:port: no other port of 127.0.0.1 is reachable.
        url_allow_hosts=photo_server.removeprefix("http://"),
    )
    with open_services(settings) as opened:
        yield opened


def stored_inputs(services: Services) -> list[Path]:
    root = services.settings.artifacts_path / "inputs"
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def check_refused(
    client: TestClient, services: Services, response: Any, status: int, code: str
) -> None:
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert error["code"] == code, error
    assert error["message"] and "Traceback" not in response.text
    assert stored_inputs(services) == []
    assert client.get("/api/v1/tasks").json()["tasks"] == []


@pytest.mark.parametrize(
    ("name", "data", "status", "code"), FILE_CASES, ids=[c[0] for c in FILE_CASES]
)
def test_hostile_files(
    client: TestClient, services: Services, name: str, data: bytes, status: int, code: str
) -> None:
    response = client.post("/api/v1/generate", files={"image": (f"{name}.bin", data, "image/png")})
    check_refused(client, services, response, status, code)


@pytest.mark.parametrize(
    ("name", "body", "status", "code"), JSON_CASES, ids=[c[0] for c in JSON_CASES]
)
def test_hostile_json(
    client: TestClient, services: Services, name: str, body: Any, status: int, code: str
) -> None:
    raw = json.dumps(body, allow_nan=True).encode()
    response = client.post(
        "/api/v1/generate", content=raw, headers={"Content-Type": "application/json"}
    )
    check_refused(client, services, response, status, code)


@pytest.mark.parametrize(
    ("name", "body", "content_type", "status", "code"), RAW_CASES, ids=[c[0] for c in RAW_CASES]
)
def test_hostile_bodies(
    client: TestClient,
    services: Services,
    name: str,
    body: bytes,
    content_type: str | None,
    status: int,
    code: str,
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post("/api/v1/generate", content=body, headers=headers)
    check_refused(client, services, response, status, code)


def test_multipart_edge_cases(client: TestClient, services: Services) -> None:
    photo = ("p.png", PNG, "image/png")
    cases = [
        ({"files": [("image", photo)] * 9}, 400, "bad_request"),  # more files than allowed
        ({"files": {"other": photo}}, 422, "unexpected_field"),
        ({"data": {"seed": "1"}, "files": {}}, 415, "unsupported_content_type"),
        ({"files": {"image": photo}, "data": {"options": "{broken"}}, 422, "invalid_options"),
        ({"files": {"image": photo}, "data": {"options": "[1]"}}, 422, "invalid_options"),
        ({"files": {"image": photo}, "data": {"seed": "one"}}, 422, "invalid_option"),
        ({"files": {"image": photo}, "data": {"formats": "glb,exe"}}, 422, "invalid_option"),
    ]
    for kwargs, status, code in cases:
        check_refused(client, services, client.post("/api/v1/generate", **kwargs), status, code)
    empty_multipart = client.post(
        "/api/v1/generate",
        data={"seed": "1"},
        headers={"Content-Type": "multipart/form-data; boundary=x"},
    )
    # A body that is not multipart under a multipart Content-Type: the parser refuses it.
    check_refused(client, services, empty_multipart, 400, "bad_request")


ID_CASES: list[tuple[str, str, int]] = [
    ("traversal", "/api/v1/task/..%2F..%2Fetc%2Fpasswd", 404),
    (
        "traversal-format",
        "/api/v1/task/00000000-0000-0000-0000-000000000000/result/..%2F..%2Fx",
        404,
    ),
    ("sql-id", "/api/v1/task/1'%20OR%20'1'='1", 404),
    ("sql-status", "/api/v1/tasks?status=queued'%20OR%201=1--", 422),
    ("sql-cursor", "/api/v1/tasks?cursor=' OR 1=1--", 422),
    ("limit-zero", "/api/v1/tasks?limit=0", 422),
    ("limit-huge", "/api/v1/tasks?limit=100000", 422),
    ("nul-id", "/api/v1/task/%00", 400),
    ("control-id", "/api/v1/task/a%01b", 400),
    ("nul-batch", "/api/v1/tasks?batch_id=a%00b", 400),
    ("del-cursor", "/api/v1/tasks?cursor=a%7Fb", 400),
    ("unicode-id", "/api/v1/task/%E2%80%AE%F0%9F%92%A3", 404),
    ("long-id", "/api/v1/task/" + "a" * 5000, 404),
]


@pytest.mark.parametrize(("name", "path", "status"), ID_CASES, ids=[c[0] for c in ID_CASES])
def test_hostile_paths(client: TestClient, name: str, path: str, status: int) -> None:
    response = client.get(path)
    assert response.status_code == status
    assert response.json()["error"]["code"]


def test_idempotency_key_too_long(client: TestClient, services: Services) -> None:
    response = client.post(
        "/api/v1/generate",
        headers={"Idempotency-Key": "k" * 500},
        files={"image": ("p.png", PNG, "image/png")},
    )
    check_refused(client, services, response, 422, "invalid_request")


@pytest.mark.parametrize(("name", "data"), ACCEPTED_FILES, ids=[c[0] for c in ACCEPTED_FILES])
def test_unusual_but_valid_photos_are_accepted(
    client: TestClient, services: Services, name: str, data: bytes
) -> None:
    response = client.post("/api/v1/generate", files={"image": (name, data, "image/jpeg")})
    assert response.status_code == 202, response.text
    (stored,) = stored_inputs(services)
    # Stored as it came; the worker reads it as RGB or RGBA, oriented.
    assert load_stored_input(stored.read_bytes()).mode in ("RGB", "RGBA")


class _PhotoServer(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/photo.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)
        elif self.path == "/redirect-private":
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{self.server.server_port}/photo.png")
            self.end_headers()
        elif self.path == "/redirect-other-port":
            self.send_response(302)
            self.send_header("Location", "http://127.0.0.1:9/photo.png")
            self.end_headers()
        elif self.path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.end_headers()
        elif self.path == "/huge":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"\xff\xd8\xff" + b"\0" * (MAX_BYTES + 100))
        elif self.path == "/slow":
            time.sleep(3)
            self.send_response(200)
            self.end_headers()
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def photo_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _PhotoServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_image_url_fetch_limits_and_redirect_checks(
    client: TestClient, services: Services, photo_server: str
) -> None:
    # 127.0.0.1:<port> is on this test's allow list (PHOTO3D_URL_ALLOW_HOSTS); "localhost" is
    # not, nor is any other port of 127.0.0.1.
    for path, status, code in [
        ("/redirect-private", 422, "forbidden_image_url"),
        ("/redirect-other-port", 422, "forbidden_image_url"),
        ("/loop", 422, "too_many_redirects"),
        ("/huge", 413, "image_too_large"),
        ("/slow", 422, "image_url_timeout"),
        ("/missing", 422, "unreachable_image_url"),
    ]:
        response = client.post("/api/v1/generate", json={"image_url": photo_server + path})
        check_refused(client, services, response, status, code)
    ok = client.post("/api/v1/generate", json={"image_url": photo_server + "/photo.png"})
    assert ok.status_code == 202, ok.text


def test_server_keeps_serving_after_the_corpus(client: TestClient) -> None:
    for _, data, status, code in FILE_CASES[:10]:
        response = client.post("/api/v1/generate", files={"image": ("x", data, "image/png")})
        assert (response.status_code, response.json()["error"]["code"]) == (status, code)
    assert client.get("/api/v1/tasks").status_code == 200
    assert client.get("/health").json()["database"] == "ok"
