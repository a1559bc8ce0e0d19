"""The typed result of a task: what the worker stores in `tasks.result` and every reader (the
service, the API schemas, the bulk job) parses. The JSON shape in the database is unchanged:

    {"files": {"glb": {"key", "bytes", "media_type", "filename", "ready"}, ...},
     "preview": {"key", "bytes", "media_type", "ready"},
     "stats": {...}, "timings": {"generate_s", "total_s"}, "worker_id": "..."}
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from serve_app.store.db import Row


class StoredFile(BaseModel):
    """A file in the artifact store with what a download needs to serve it."""

    model_config = ConfigDict(frozen=True)

    key: str
    bytes: int | None = None
    media_type: str
    filename: str
    # Issue 11: False for a format asked for besides GLB from the task's success until the
    # worker has converted and stored it (it converts after `succeeded`, off the claim loop);
    # readers convert it on demand. Results stored before this field read as ready.
    ready: bool = True


class Preview(BaseModel):
    """The PNG preview of a result (its file name is fixed)."""

    model_config = ConfigDict(frozen=True)

    key: str
    bytes: int | None = None
    media_type: str = "image/png"
    # False from the task's success until the worker has rendered it (it renders after the task
    # is marked succeeded, so the preview never delays a result); readers render it on demand.
    ready: bool = True

    def as_file(self) -> StoredFile:
        return StoredFile(
            key=self.key, bytes=self.bytes, media_type=self.media_type, filename="preview.png"
        )


class ResultTimings(BaseModel):
    generate_s: float | None = Field(default=None, description="Seconds the backend took.")
    total_s: float | None = Field(default=None, description="Seconds the whole attempt took.")


class TaskResult(BaseModel):
    """What a succeeded attempt produced."""

    files: dict[str, StoredFile]
    preview: Preview
    stats: dict[str, Any] = Field(default_factory=dict)
    timings: ResultTimings = Field(default_factory=lambda: ResultTimings())
    worker_id: str | None = None

    @classmethod
    def of_row(cls, row: Row) -> TaskResult | None:
        """The result of a task row, or None while it has none (not succeeded, or expired)."""
        raw = row.get("result")
        if row.get("status") != "succeeded" or not raw:
            return None
        return cls.model_validate(raw)

    def to_json(self) -> dict[str, Any]:
        """The JSON stored in the database."""
        return self.model_dump(mode="json")
