"""Signed download links: what the signature covers, and when a link stops working."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest

from serve_app.accounts import Forbidden
from serve_app.downloads import DownloadSigner
from serve_app.errors import Gone

TASK = "5b0c8d7e-2a55-4d43-9f0e-1f2a3b4c5d6e"


def parts(url: str) -> tuple[str, str, str, int, str]:
    split = urlsplit(url)
    *_, task, kind = split.path.split("/")
    query = {k: v[0] for k, v in parse_qs(split.query).items()}
    return query["account"], task, kind, int(query["expires"]), query["signature"]


def test_a_link_verifies_until_it_expires_then_answers_gone() -> None:
    now = [1_000_000.0]
    signer = DownloadSigner(b"k" * 32, ttl_seconds=900, clock=lambda: now[0])
    url = signer.link("alice", TASK, "glb")
    assert url.startswith(f"/api/v1/download/{TASK}/glb?")
    assert signer.verify(*parts(url)) == 900
    now[0] += 900
    assert signer.verify(*parts(url)) == 0
    now[0] += 1
    with pytest.raises(Gone) as expired:
        signer.verify(*parts(url))
    assert expired.value.http_status == 410 and expired.value.code == "link_expired"


@pytest.mark.parametrize("field", range(5))
def test_changing_any_part_breaks_the_signature(field: int) -> None:
    signer = DownloadSigner(b"k" * 32, ttl_seconds=900)
    good = list(parts(signer.link("alice", TASK, "glb")))
    changed = {0: "bob", 1: TASK.replace("5b", "6b"), 2: "usdz", 3: good[3] + 60, 4: "x" * 43}
    good[field] = changed[field]
    with pytest.raises(Forbidden) as refused:
        signer.verify(*good)  # type: ignore[arg-type]
    assert refused.value.http_status == 403


def test_another_key_signs_differently_and_the_key_is_never_shown() -> None:
    one = DownloadSigner(b"a" * 32, ttl_seconds=60, clock=lambda: 0)
    two = DownloadSigner(b"b" * 32, ttl_seconds=60, clock=lambda: 0)
    with pytest.raises(Forbidden):
        two.verify(*parts(one.link("alice", TASK, "glb")))
    assert "aaaa" not in repr(one)
