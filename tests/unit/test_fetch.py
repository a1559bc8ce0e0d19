"""The image_url SSRF filter: every IPv6 spelling of a private IPv4 address is refused, directly
and after a redirect, before anything connects; the allow list opens one host:port, not a host."""

from __future__ import annotations

import asyncio
import ipaddress
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from serve_app.errors import Photo3DError
from serve_app.fetch import embedded_ipv4, fetch_image_url, is_public_address, parse_allow_list

# Each embeds a loopback or otherwise private address (the spellings of issue 10, and more).
PRIVATE_SPELLINGS = [
    "::7f00:1",  # IPv4-compatible, hex
    "::127.0.0.1",  # IPv4-compatible, dotted
    "::ffff:127.0.0.1",  # IPv4-mapped
    "::ffff:0:7f00:1",  # IPv4-translated (SIIT)
    "64:ff9b::7f00:1",  # NAT64 well-known prefix
    "2002:7f00:1::",  # 6to4 of 127.0.0.1
    "64:ff9b:1::a00:1",  # NAT64 local-use prefix, 10.0.0.1
    "2002:a9fe:a9fe::1",  # 6to4 of the metadata address 169.254.169.254
    "2001:0:808:808:0:0:80ff:fffe",  # Teredo, client 127.0.0.1
    "fec0::1",  # site-local
    "::1",
    "fe80::1",
    "fc00::1",
    "ff02::1",
]
PUBLIC = ["8.8.8.8", "2606:4700:4700::1111", "64:ff9b::808:808"]


@pytest.mark.parametrize("spelling", PRIVATE_SPELLINGS)
def test_private_spellings_are_not_public(spelling: str) -> None:
    assert not is_public_address(ipaddress.ip_address(spelling))


@pytest.mark.parametrize("spelling", PUBLIC)
def test_public_addresses_pass(spelling: str) -> None:
    assert is_public_address(ipaddress.ip_address(spelling))


def test_embedded_ipv4_is_found_in_every_form() -> None:
    loopback = ipaddress.IPv4Address("127.0.0.1")
    for spelling in [*PRIVATE_SPELLINGS[:6], PRIVATE_SPELLINGS[8]]:
        assert loopback in embedded_ipv4(ipaddress.IPv6Address(spelling)), spelling


def test_allow_list_names_host_and_port() -> None:
    assert parse_allow_list("bucket.internal:9000, [::1]:8080,files") == {
        "bucket.internal:9000",
        "[::1]:8080",
        "files:80",
        "files:443",
    }


class _Server(BaseHTTPRequestHandler):
    hits: list[str]
    redirect_to = ""

    def do_GET(self) -> None:
        self.server.hits.append(self.path)  # type: ignore[attr-defined]
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", self.server.redirect_to)  # type: ignore[attr-defined]
            self.end_headers()
        else:
            self.send_response(200)
            self.send_header("Content-Length", "3")
            self.end_headers()
            self.wfile.write(b"abc")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def servers() -> Iterator[tuple[ThreadingHTTPServer, ThreadingHTTPServer]]:
    """Two loopback servers: the first is on the allow list, the second is not."""
    started = []
    for _ in range(2):
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Server)
        server.hits = []  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        started.append(server)
    yield started[0], started[1]
    for server in started:
        server.shutdown()


def fetch(url: str, allowed: ThreadingHTTPServer) -> bytes:
    return asyncio.run(
        fetch_image_url(
            url,
            max_bytes=1000,
            timeout=5,
            max_redirects=3,
            allow_hosts={f"127.0.0.1:{allowed.server_port}"},
        )
    )


def refused_code(url: str, allowed: ThreadingHTTPServer) -> str:
    with pytest.raises(Photo3DError) as caught:
        fetch(url, allowed)
    return caught.value.code


@pytest.mark.parametrize("spelling", PRIVATE_SPELLINGS)
def test_each_spelling_is_refused_directly_and_after_a_redirect(
    servers: tuple[ThreadingHTTPServer, ThreadingHTTPServer], spelling: str
) -> None:
    allowed, other = servers
    target = f"http://[{spelling}]:{other.server_port}/photo.png"
    assert refused_code(target, allowed) == "forbidden_image_url"
    allowed.redirect_to = target  # type: ignore[attr-defined]
    assert refused_code(f"http://127.0.0.1:{allowed.server_port}/redirect", allowed) == (
        "forbidden_image_url"
    )
    assert other.hits == []  # type: ignore[attr-defined]


def test_allowed_host_opens_one_port_only(
    servers: tuple[ThreadingHTTPServer, ThreadingHTTPServer],
) -> None:
    allowed, other = servers
    assert fetch(f"http://127.0.0.1:{allowed.server_port}/photo.png", allowed) == b"abc"
    other_url = f"http://127.0.0.1:{other.server_port}/photo.png"
    assert refused_code(other_url, allowed) == "forbidden_image_url"
    allowed.redirect_to = other_url  # type: ignore[attr-defined]
    assert refused_code(f"http://127.0.0.1:{allowed.server_port}/redirect", allowed) == (
        "forbidden_image_url"
    )
    assert other.hits == []  # type: ignore[attr-defined]


def test_control_characters_in_the_url_are_refused(
    servers: tuple[ThreadingHTTPServer, ThreadingHTTPServer],
) -> None:
    allowed, _ = servers
    assert refused_code(f"http://127.0.0.1:{allowed.server_port}/a\x00b", allowed) == (
        "invalid_image_url"
    )
