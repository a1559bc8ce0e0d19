"""Fetch a photo from `image_url` without becoming a proxy into the private network (SSRF).

Only http(s); the host is resolved once and every address checked (no loopback, private,
link-local, metadata, multicast or reserved addresses); the connection goes to the checked
address (so a DNS answer cannot change between check and use); redirects are followed by hand
and re-checked; size and time are bounded."""

from __future__ import annotations

import ipaddress
import socket
import time
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

from serve_app.errors import InvalidInput, PayloadTooLarge

_DEFAULT_PORTS = {"http": 80, "https": 443}


class ForbiddenURL(InvalidInput):
    code = "forbidden_image_url"
    http_status = 422


def _checked_address(host: str, port: int, allow_hosts: set[str]) -> str:
    """An address of `host` that is safe to connect to, or ForbiddenURL."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise InvalidInput(
            f"image_url host {host!r} could not be resolved", code="unreachable_image_url"
        ) from exc
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    if host.lower() not in allow_hosts:
        for address in addresses:
            mapped = getattr(address, "ipv4_mapped", None) or address
            if not mapped.is_global or mapped.is_multicast:
                raise ForbiddenURL(
                    "image_url points to a private, loopback, link-local or reserved address; "
                    "only public addresses may be fetched"
                )
    return str(addresses[0])


def fetch_image_url(
    url: str,
    *,
    max_bytes: int,
    timeout: float,
    max_redirects: int,
    allow_hosts: set[str] | None = None,
) -> bytes:
    """The body of `url` (at most max_bytes), following at most max_redirects redirects."""
    allow = allow_hosts or set()
    deadline = time.monotonic() + timeout
    if not isinstance(url, str) or len(url) > 2048:
        raise InvalidInput(
            "image_url must be a URL of at most 2048 characters", code="invalid_image_url"
        )
    for _hop in range(max_redirects + 1):
        parts = urlsplit(url)
        if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
            raise InvalidInput(
                "image_url must be an http:// or https:// URL", code="invalid_image_url"
            )
        if parts.username or parts.password:
            raise InvalidInput("image_url must not contain credentials", code="invalid_image_url")
        try:
            port = parts.port or _DEFAULT_PORTS[parts.scheme]
        except ValueError as exc:
            raise InvalidInput("image_url has an invalid port", code="invalid_image_url") from exc
        host = parts.hostname
        address = _checked_address(host, port, allow)
        ip_host = f"[{address}]" if ":" in address else address
        direct = urlunsplit((parts.scheme, f"{ip_host}:{port}", parts.path or "/", parts.query, ""))
        headers = {
            "Host": parts.netloc.rsplit("@", 1)[-1],
            "Accept": "image/*",
            "User-Agent": "photo3d-fetch/1",
        }
        remaining = max(0.1, deadline - time.monotonic())
        try:
            with httpx.Client(timeout=remaining, follow_redirects=False, trust_env=False) as client:
                request = client.build_request(
                    "GET", direct, headers=headers, extensions={"sni_hostname": host}
                )
                response = client.send(request, stream=True)
                try:
                    if response.is_redirect:
                        location = response.headers.get("location", "")
                        url = urljoin(url, location)
                        continue
                    if response.status_code != 200:
                        raise InvalidInput(
                            f"image_url answered HTTP {response.status_code}",
                            code="unreachable_image_url",
                        )
                    declared = response.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > max_bytes:
                        raise PayloadTooLarge(
                            f"image_url is larger than {max_bytes} bytes", code="image_too_large"
                        )
                    body = bytearray()
                    for chunk in response.iter_bytes():
                        body += chunk
                        if len(body) > max_bytes:
                            raise PayloadTooLarge(
                                f"image_url is larger than {max_bytes} bytes",
                                code="image_too_large",
                            )
                        if time.monotonic() > deadline:
                            raise InvalidInput("image_url took too long", code="image_url_timeout")
                    return bytes(body)
                finally:
                    response.close()
        except httpx.TimeoutException as exc:
            raise InvalidInput("image_url took too long", code="image_url_timeout") from exc
        except httpx.HTTPError as exc:
            raise InvalidInput(
                f"image_url could not be fetched ({type(exc).__name__})",
                code="unreachable_image_url",
            ) from exc
    raise InvalidInput(
        f"image_url redirected more than {max_redirects} times", code="too_many_redirects"
    )
