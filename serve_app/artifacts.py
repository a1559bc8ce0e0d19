"""Artifact store: input photos and generated files, addressed by key ("tasks/<id>/...").

The local directory store is the default; an S3-compatible store implements the same small
interface. Writes are atomic (temp file + rename) so a reader never sees half a file."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Protocol

from serve_app.errors import ArtifactStoreError, NotFound

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
