"""Artifact store: input photos and generated files, addressed by key ("tasks/<id>/...").

The local directory store is the default; an S3-compatible store (`PHOTO3D_ARTIFACT_URL=
s3://bucket/prefix`) implements the same small interface. Writes are atomic (temp file + rename
locally, a single PUT or a completed multipart upload on S3) so a reader never sees half a file."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from serve_app.errors import ArtifactStoreError, NotFound

if TYPE_CHECKING:
    from serve_app.settings import Settings

CHUNK_BYTES = 1024 * 1024  # what a download streams at a time

_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*")


def check_key(key: str) -> str:
    """Refuse keys that could escape the store (`..`, absolute paths, odd characters)."""
    if not _KEY.fullmatch(key) or ".." in key.split("/"):
        raise ArtifactStoreError(f"invalid artifact key {key!r}", code="invalid_artifact_key")
    return key


class ArtifactStore(Protocol):
    """Where photos and results live."""

    def put(self, key: str, data: bytes) -> None: ...

    def get(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int: ...

    def local_path(self, key: str) -> Path | None:
        """A filesystem path to stream from, when the store has one."""

    def iter_chunks(self, key: str) -> Iterator[bytes]:
        """The artifact's bytes a chunk at a time (downloads never hold a whole file)."""
        ...

    def presigned_url(
        self, key: str, expires_in: int, *, filename: str, media_type: str, inline: bool
    ) -> str | None:
        """A URL anyone may GET for `expires_in` seconds, when the store can sign one."""

    def delete_prefix(self, prefix: str) -> None: ...

    def check(self) -> None:
        """Raise ArtifactStoreError when the store cannot be written."""


class LocalArtifactStore:
    """Artifacts as files under one directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise ArtifactStoreError(
                f"could not write artifact {key}: {exc.strerror or exc}"
            ) from exc

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as exc:
            raise NotFound(f"artifact {key} not found") from exc
        except OSError as exc:
            raise ArtifactStoreError(f"could not read artifact {key}: {exc.strerror}") from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError as exc:
            raise NotFound(f"artifact {key} not found") from exc

    def local_path(self, key: str) -> Path | None:
        path = self._path(key)
        return path if path.is_file() else None

    def iter_chunks(self, key: str) -> Iterator[bytes]:
        try:
            fh = self._path(key).open("rb")
        except FileNotFoundError as exc:
            raise NotFound(f"artifact {key} not found") from exc
        with fh:
            while chunk := fh.read(CHUNK_BYTES):
                yield chunk

    def presigned_url(
        self, key: str, expires_in: int, *, filename: str, media_type: str, inline: bool
    ) -> str | None:
        return None  # downloads go through the ingress's own signed links

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix.rstrip("/"))
        try:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        except (FileNotFoundError, NotADirectoryError):
            pass  # nothing there: nothing to delete
        except OSError as exc:
            raise ArtifactStoreError(f"could not delete {prefix}: {exc.strerror}") from exc

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".probe-"):
                pass
        except OSError as exc:
            raise ArtifactStoreError(f"artifact directory not writable: {exc.strerror}") from exc


# --- S3-compatible object storage ------------------------------------------------------------
# Built on boto3 rather than obstore: boto3 reads the standard AWS variables (AWS_ENDPOINT_URL,
# AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, profiles, instance and IRSA roles) exactly
# as every other AWS tool does, its presigned URLs and multipart uploads are the reference
# implementation that S3-compatible servers (SeaweedFS, MinIO, Ceph, R2) test against, and its
# API is synchronous like the worker and the store. obstore is faster for bulk parallel I/O,
# which a service writing a handful of files per task does not need.

MULTIPART_BYTES = 64 * 1024 * 1024  # above this, uploads go in parts (never one huge request)
MULTIPART_CHUNK_BYTES = 16 * 1024 * 1024

_DENIED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden"}
_MISSING_BUCKET = {"404", "NoSuchBucket", "NotFound"}


def parse_artifact_url(url: str) -> tuple[str, str]:
    """(bucket, key prefix) of `s3://bucket/prefix`; a clear config error otherwise."""
    parts = urlsplit(url)
    bucket, prefix = parts.netloc, parts.path.strip("/")
    if parts.scheme != "s3" or not bucket or parts.query or parts.fragment:
        raise ArtifactStoreError(
            f"PHOTO3D_ARTIFACT_URL must look like s3://bucket/prefix, not {url!r}",
            code="config_error",
        )
    if prefix:
        check_key(prefix)
    return bucket, prefix


def _s3_client(endpoint: str | None, *, probe: bool = False) -> Any:
    import boto3
    from botocore.config import Config

    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    config = Config(
        signature_version="s3v4",
        # Self-hosted servers (SeaweedFS, MinIO) answer on one host name, not bucket.host.
        s3={"addressing_style": "path" if endpoint else "auto"},
        connect_timeout=2 if probe else 5,
        read_timeout=10 if probe else 60,
        retries={"mode": "standard", "total_max_attempts": 1 if probe else 4},
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name=region, config=config
    )


class S3ArtifactStore:
    """Artifacts as objects under `prefix/` in one S3-compatible bucket."""

    def __init__(self, bucket: str, prefix: str = "", *, public_endpoint: str | None = None):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint = (
            os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
        )
        self.client = _s3_client(self.endpoint)
        self._probe = _s3_client(self.endpoint, probe=True)
        # Signing is local arithmetic: a client for the public endpoint never connects anywhere.
        self._signer = _s3_client(public_endpoint) if public_endpoint else self.client

    @classmethod
    def from_url(cls, url: str, *, public_endpoint: str | None = None) -> S3ArtifactStore:
        bucket, prefix = parse_artifact_url(url)
        return cls(bucket, prefix, public_endpoint=public_endpoint)

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, exc: Exception, doing: str) -> ArtifactStoreError:
        """One place where boto errors become the project's own, naming the likely cause."""
        from botocore.exceptions import (
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        where = f"bucket {self.bucket!r}" + (f" at {self.endpoint}" if self.endpoint else "")
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return ArtifactStoreError(
                f"no S3 credentials for {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
                code="artifact_store_credentials",
            )
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _MISSING_BUCKET and doing == "check":
                return ArtifactStoreError(
                    f"{where} does not exist; create it first", code="artifact_bucket_missing"
                )
            if code in _DENIED:
                return ArtifactStoreError(
                    f"access to {where} denied ({code}): check AWS_ACCESS_KEY_ID, "
                    "AWS_SECRET_ACCESS_KEY and the bucket policy",
                    code="artifact_store_credentials",
                )
            return ArtifactStoreError(f"S3 error while {doing} ({code}) on {where}")
        if isinstance(exc, EndpointConnectionError):
            return ArtifactStoreError(
                f"cannot reach the S3 endpoint of {where}", code="artifact_store_unreachable"
            )
        return ArtifactStoreError(f"S3 error while {doing} on {where}: {type(exc).__name__}")

    def _not_found(self, exc: Exception) -> bool:
        from botocore.exceptions import ClientError

        return isinstance(exc, ClientError) and str(
            exc.response.get("Error", {}).get("Code", "")
        ) in {"404", "NoSuchKey", "NotFound"}

    def put(self, key: str, data: bytes) -> None:
        full = self._key(key)
        try:
            if len(data) <= MULTIPART_BYTES:
                self.client.put_object(Bucket=self.bucket, Key=full, Body=data)
            else:
                import io

                from boto3.s3.transfer import TransferConfig

                # BytesIO over bytes shares the buffer (no copy); parts are read one at a time.
                self.client.upload_fileobj(
                    io.BytesIO(data),
                    self.bucket,
                    full,
                    Config=TransferConfig(
                        multipart_threshold=MULTIPART_BYTES,
                        multipart_chunksize=MULTIPART_CHUNK_BYTES,
                    ),
                )
        except Exception as exc:
            raise self._error(exc, f"writing {key}") from exc

    def get(self, key: str) -> bytes:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            try:
                data: bytes = body.read()
            finally:
                body.close()
            return data
        except Exception as exc:
            if self._not_found(exc):
                raise NotFound(f"artifact {key} not found") from exc
            raise self._error(exc, f"reading {key}") from exc

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            head: dict[str, Any] = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return head
        except Exception as exc:
            if self._not_found(exc):
                return None
            raise self._error(exc, f"looking up {key}") from exc

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def size(self, key: str) -> int:
        head = self._head(key)
        if head is None:
            raise NotFound(f"artifact {key} not found")
        return int(head["ContentLength"])

    def local_path(self, key: str) -> Path | None:
        return None

    def iter_chunks(self, key: str) -> Iterator[bytes]:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except Exception as exc:
            if self._not_found(exc):
                raise NotFound(f"artifact {key} not found") from exc
            raise self._error(exc, f"reading {key}") from exc
        try:
            yield from body.iter_chunks(CHUNK_BYTES)
        finally:
            body.close()

    def presigned_url(
        self, key: str, expires_in: int, *, filename: str, media_type: str, inline: bool
    ) -> str | None:
        disposition = "inline" if inline else f'attachment; filename="{filename}"'
        url: str = self._signer.generate_presigned_url(
            "get_object",
            Params={
                "Bucket": self.bucket,
                "Key": self._key(key),
                "ResponseContentType": media_type,
                "ResponseContentDisposition": disposition,
            },
            ExpiresIn=max(1, int(expires_in)),
        )
        return url

    def delete_prefix(self, prefix: str) -> None:
        full = self._key(prefix.rstrip("/"))
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full
            )
            for page in pages:
                keys = [
                    {"Key": o["Key"]}
                    for o in page.get("Contents", [])
                    if o["Key"] == full or o["Key"].startswith(full + "/")
                ]
                if keys:
                    self.client.delete_objects(
                        Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True}
                    )
        except Exception as exc:
            raise self._error(exc, f"deleting {prefix}") from exc

    def check(self) -> None:
        """The bucket exists and these credentials may write to it (a probe object)."""
        probe = self._key("photo3d-probe")
        try:
            self._probe.head_bucket(Bucket=self.bucket)
            self._probe.put_object(Bucket=self.bucket, Key=probe, Body=b"")
            self._probe.delete_object(Bucket=self.bucket, Key=probe)
        except Exception as exc:
            raise self._error(exc, "check") from exc


def open_artifact_store(settings: Settings) -> ArtifactStore:
    """The store the settings choose: S3 for `PHOTO3D_ARTIFACT_URL=s3://…`, else a folder."""
    if settings.artifact_url:
        return S3ArtifactStore.from_url(
            settings.artifact_url, public_endpoint=settings.s3_public_endpoint
        )
    return LocalArtifactStore(settings.artifacts_path)
