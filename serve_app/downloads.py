"""Signed, short-lived download links: what the API hands out for results, previews and
turntables, so a browser (the viewer, a download, AR Quick Look) fetches them without a Bearer
header.

A link is `/api/v1/download/<task>/<kind>?account=…&expires=…&signature=…`, the signature an
HMAC-SHA256 over (account, task, kind, expiry) with the service's URL signing key. Changing any
part breaks the signature (403); a genuine link past its expiry answers 410. The ingress then
streams the file from the local store, or redirects to a presigned URL of the S3 store that
lives no longer than the link (so the bytes come straight from the bucket).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

from serve_app.accounts import Forbidden
from serve_app.errors import Gone, InvalidInput
from serve_app.settings import Settings

KEY_FILE = "url-signing.key"
MIN_KEY_CHARS = 32
# After a link's last second, a redirect it issued stays valid this long (to be followed).
REDIRECT_GRACE_SECONDS = 10


def load_signing_key(settings: Settings, *, create: bool | None = None) -> bytes:
    """PHOTO3D_URL_SIGNING_KEY, or the key kept in `<run_dir>/url-signing.key` (made on first use
    outside production). Never logged."""
    if settings.url_signing_key is not None:
        key = settings.url_signing_key.get_secret_value()
        if len(key) < MIN_KEY_CHARS:
            raise InvalidInput(
                f"PHOTO3D_URL_SIGNING_KEY must be at least {MIN_KEY_CHARS} characters",
                code="config_error",
            )
        if settings.environment == "production" and "CHANGE_ME" in key.upper():
            raise InvalidInput(
                "PHOTO3D_URL_SIGNING_KEY is still the example's placeholder", code="config_error"
            )
        return key.encode()
    path = Path(settings.run_dir) / KEY_FILE
    if create is None:
        create = settings.environment != "production"
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        if not create:
            raise InvalidInput(
                "PHOTO3D_URL_SIGNING_KEY is not set (needed to sign download links)",
                code="config_error",
            ) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes().strip()  # another process made it first: use theirs
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_urlsafe(48))
    return path.read_bytes().strip()


class DownloadSigner:
    """Makes and checks signed download links."""

    def __init__(
        self,
        key: bytes,
        ttl_seconds: int,
        *,
        base: str = "/api/v1",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = key
        self.ttl_seconds = ttl_seconds
        self.base = base
        self.clock = clock

    def __repr__(self) -> str:  # never show the key
        return f"DownloadSigner(ttl_seconds={self.ttl_seconds})"

    def _signature(self, account_id: str, task_id: str, kind: str, expires: int) -> str:
        message = f"photo3d-download-v1\n{account_id}\n{task_id}\n{kind}\n{expires}".encode()
        digest = hmac.new(self._key, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def link(self, account_id: str, task_id: str, kind: str) -> str:
        """A link to one artifact of one task of one account, valid for ttl_seconds."""
        expires = int(self.clock()) + self.ttl_seconds
        signature = self._signature(account_id, task_id, kind, expires)
        return (
            f"{self.base}/download/{quote(task_id, safe='')}/{quote(kind, safe='')}"
            f"?account={quote(account_id, safe='')}&expires={expires}&signature={signature}"
        )

    def linker(self, account_id: str) -> Callable[[str, str], str]:
        """link() for one account: (task id, kind) -> URL."""
        return lambda task_id, kind: self.link(account_id, task_id, kind)

    def verify(self, account_id: str, task_id: str, kind: str, expires: int, signature: str) -> int:
        """Seconds the link has left; Forbidden when it was altered, Gone when it expired."""
        expected = self._signature(account_id, task_id, kind, expires)
        if not hmac.compare_digest(expected.encode(), signature.encode()):
            raise Forbidden("this download link is not valid", code="invalid_signature")
        left = expires - int(self.clock())
        if left < 0:
            raise Gone(
                "this download link has expired; ask the API for the task again",
                code="link_expired",
            )
        return left


def signer_from_settings(settings: Settings) -> DownloadSigner:
    return DownloadSigner(load_signing_key(settings), settings.download_url_ttl_seconds)
