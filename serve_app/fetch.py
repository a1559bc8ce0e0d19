"""Fetch a photo from `image_url` without becoming a proxy into the private network (SSRF).

Only http(s). The host is resolved once and every address judged by `is_public_address`: an
IPv6 address that embeds an IPv4 one (mapped, translated, compatible, NAT64, 6to4, Teredo) is
judged by the IPv4 address too, and only addresses `ipaddress` calls global pass. The connection
goes to the judged address (so a DNS answer cannot change between check and use), and the peer
the socket actually reached is judged again. Redirects are followed by hand and re-checked. The
whole fetch, redirects and slow servers included, has one deadline.

`allow_hosts` lists `host:port` pairs that may be reached even on private addresses (an internal
bucket); a bare `host` allows only the scheme's default port."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

from serve_app.errors import InvalidInput, PayloadTooLarge

_DEFAULT_PORTS = {"http": 80, "https": 443}

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# IPv6 prefixes whose low 32 bits are an IPv4 address.
_LOW32_PREFIXES = [
    ipaddress.IPv6Network("::ffff:0:0/96"),  # IPv4-mapped
    ipaddress.IPv6Network("::ffff:0:0:0/96"),  # IPv4-translated (SIIT)
    ipaddress.IPv6Network("::/96"),  # IPv4-compatible (deprecated)
    ipaddress.IPv6Network("64:ff9b::/96"),  # NAT64, well-known prefix
    ipaddress.IPv6Network("64:ff9b:1::/48"),  # NAT64, local-use prefix
]


class ForbiddenURL(InvalidInput):
    code = "forbidden_image_url"
    http_status = 422


def embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """Every IPv4 address an IPv6 address carries (mapped, translated, compatible, NAT64,
    6to4, Teredo server and client)."""
    found: list[ipaddress.IPv4Address] = []
    if any(address in prefix for prefix in _LOW32_PREFIXES):
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address.teredo is not None:
        found.extend(address.teredo)
    return found


def is_public_address(address: IPAddress) -> bool:
    """Whether a fetch may connect to `address`: it and every IPv4 address it embeds are
    global unicast (site-local IPv6 counts as private, as RFC 3879 left it)."""
    if address.is_multicast or not address.is_global:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        if address.is_site_local:
            return False
        return all(v4.is_global and not v4.is_multicast for v4 in embedded_ipv4(address))
    return True


def allow_key(host: str, port: int) -> str:
    """How `host:port` is spelled in the allow list (IPv6 literals in brackets)."""
    host = host.lower().strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_allow_list(text: str) -> set[str]:
    """`PHOTO3D_URL_ALLOW_HOSTS` as a set of `host:port` keys; a bare host means ports 80, 443."""
    allowed: set[str] = set()
    for entry in (e.strip().lower() for e in text.split(",")):
        if not entry:
            continue
        parts = urlsplit(f"//{entry}")
        try:
            port = parts.port
        except ValueError:
            port = None
        host = parts.hostname or entry
        if port is None:
            allowed |= {allow_key(host, 80), allow_key(host, 443)}
        else:
            allowed.add(allow_key(host, port))
    return allowed


def _forbidden() -> ForbiddenURL:
    return ForbiddenURL(
        "image_url points to a private, loopback, link-local or reserved address; "
        "only public addresses may be fetched"
    )


async def _checked_address(host: str, port: int, allowed: bool) -> IPAddress:
    """An address of `host` that is safe to connect to, or ForbiddenURL."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise InvalidInput(
            f"image_url host {host!r} could not be resolved", code="unreachable_image_url"
        ) from exc
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    if not addresses:
        raise InvalidInput(f"image_url host {host!r} has no address", code="unreachable_image_url")
    if not allowed and not all(is_public_address(a) for a in addresses):
        raise _forbidden()
    return addresses[0]


def _check_peer(response: httpx.Response, expected: IPAddress, allowed: bool) -> None:
    """Judge the address the socket is actually connected to."""
    stream = response.extensions.get("network_stream")
    peer = stream.get_extra_info("server_addr") if stream is not None else None
    if not peer:
        return
    address = ipaddress.ip_address(str(peer[0]).split("%")[0])
    if address != expected or not (allowed or is_public_address(address)):
        raise _forbidden()


async def fetch_image_url(
    url: str,
    *,
    max_bytes: int,
    timeout: float,
    max_redirects: int,
    allow_hosts: set[str] | None = None,
) -> bytes:
    """The body of `url` (at most max_bytes), following at most max_redirects redirects, all
    within `timeout` seconds in total."""
    if not isinstance(url, str) or len(url) > 2048:
        raise InvalidInput(
            "image_url must be a URL of at most 2048 characters", code="invalid_image_url"
        )
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise InvalidInput("image_url contains control characters", code="invalid_image_url")
    try:
        async with asyncio.timeout(timeout):
            return await _fetch(url, max_bytes, max_redirects, allow_hosts or set())
    except TimeoutError as exc:
        raise InvalidInput(
            f"image_url took longer than {timeout:g} s", code="image_url_timeout"
        ) from exc


async def _fetch(url: str, max_bytes: int, max_redirects: int, allow: set[str]) -> bytes:
    async with httpx.AsyncClient(
        timeout=None, follow_redirects=False, trust_env=False
    ) as client:  # the caller's deadline bounds every step
        for _hop in range(max_redirects + 1):
            parts = urlsplit(url)
            if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
                raise InvalidInput(
                    "image_url must be an http:// or https:// URL", code="invalid_image_url"
                )
            if parts.username or parts.password:
                raise InvalidInput(
                    "image_url must not contain credentials", code="invalid_image_url"
                )
            try:
                port = parts.port or _DEFAULT_PORTS[parts.scheme]
            except ValueError as exc:
                raise InvalidInput(
                    "image_url has an invalid port", code="invalid_image_url"
                ) from exc
            host = parts.hostname
            allowed = allow_key(host, port) in allow
            address = await _checked_address(host, port, allowed)
            ip_host = f"[{address}]" if address.version == 6 else str(address)
            direct = urlunsplit(
                (parts.scheme, f"{ip_host}:{port}", parts.path or "/", parts.query, "")
            )
            headers = {
                "Host": parts.netloc.rsplit("@", 1)[-1],
                "Accept": "image/*",
                "User-Agent": "photo3d-fetch/1",
            }
            request = client.build_request(
                "GET", direct, headers=headers, extensions={"sni_hostname": host}
            )
            try:
                response = await client.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise InvalidInput(
                    f"image_url could not be fetched ({type(exc).__name__})",
                    code="unreachable_image_url",
                ) from exc
            try:
                _check_peer(response, address, allowed)
                if response.is_redirect:
                    url = urljoin(url, response.headers.get("location", ""))
                    continue
                if response.status_code != 200:
                    raise InvalidInput(
                        f"image_url answered HTTP {response.status_code}",
                        code="unreachable_image_url",
                    )
                return await _read_limited(response, max_bytes)
            finally:
                await response.aclose()
    raise InvalidInput(
        f"image_url redirected more than {max_redirects} times", code="too_many_redirects"
    )


async def _read_limited(response: httpx.Response, max_bytes: int) -> bytes:
    too_large = PayloadTooLarge(
        f"image_url is larger than {max_bytes} bytes", code="image_too_large"
    )
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    body = bytearray()
    try:
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > max_bytes:
                raise too_large
    except httpx.HTTPError as exc:
        raise InvalidInput(
            f"image_url could not be fetched ({type(exc).__name__})", code="unreachable_image_url"
        ) from exc
    return bytes(body)
