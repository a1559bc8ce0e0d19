"""Response models of the v1 API (what OpenAPI at /docs shows)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field

from serve_app import results
from serve_app.formats import FORMATS
from serve_app.store.db import Row


class TaskStatus(StrEnum):
    """queued → running → succeeded | failed | canceled (running may go back to queued to
    retry)."""

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"


class ErrorBody(BaseModel):
    code: str = Field(description="Machine-readable error code, e.g. invalid_image.")
    message: str = Field(description="What went wrong, in words.")


class ErrorResponse(BaseModel):
    error: ErrorBody


class FileLink(BaseModel):
    format: str
    url: str = Field(description="Signed link: fetch it without a Bearer header until it expires.")
    bytes: int | None = None
    media_type: str
    ready: bool = Field(
        True,
        description="False for a moment after success while this format is converted (a task "
        "succeeds as soon as its GLB is stored; the other formats asked for follow, and `bytes` "
        "is known once ready); the url works either way: a format not stored yet is converted "
        "when it is fetched.",
    )


class TaskResult(BaseModel):
    """A result as the API shows it: download links (the stored form is results.TaskResult)."""

    files: list[FileLink]
    preview_url: str
    preview_ready: bool = Field(
        True,
        description="False for a moment after success while the preview renders (a task "
        "succeeds as soon as its model is stored); preview_url works either way.",
    )
    turntable_url: str
    format_urls: dict[str, str] = Field(
        default_factory=dict,
        description="A link per format, those not made yet included (made on first request).",
    )
    links_expire_at: dt.datetime | None = Field(
        None, description="When the signed links above stop working (ask for the task again)."
    )
    stats: dict[str, Any] = Field(default_factory=dict)


class Timings(BaseModel):
    queued_s: float | None = Field(None, description="Seconds from submit to first start.")
    running_s: float | None = Field(None, description="Seconds from first start to finish.")
    total_s: float | None = Field(None, description="Seconds from submit to finish (or now).")
    generate_s: float | None = Field(None, description="Seconds the backend took (last attempt).")


class Task(BaseModel):
    id: str
    status: TaskStatus
    backend: str
    progress: float = Field(description="0..1")
    stage: str | None = None
    queue_position: int | None = Field(
        None,
        description=(
            "Tasks ahead of this one (queued only): the same backend's queued tasks of higher"
            " priority, then older ones of the same priority. Exact up to 1000 of each; past"
            " that an estimate from enqueue numbers, at most the tasks queued ahead since"
            " (see queue_position_estimated)."
        ),
    )
    queue_position_estimated: bool | None = Field(
        None,
        description="True when queue_position is an estimate (a deep queue), false when exact.",
    )
    attempt: int
    max_attempts: int
    created_at: dt.datetime
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    timings: Timings
    options: dict[str, Any]
    error: ErrorBody | None = None
    result: TaskResult | None = None
    batch_id: str | None = None
    expired_at: dt.datetime | None = Field(None, description="When the result files were deleted.")
    credits_reserved: int = Field(0, description="Credits held for this task when accepted.")
    credits_charged: int = Field(0, description="Credits charged (on success only).")
    links: dict[str, str]


class TaskList(BaseModel):
    tasks: list[Task]
    next_cursor: str | None = Field(None, description="Pass as ?cursor= for the next page.")


class TaskEvent(BaseModel):
    id: int
    at: dt.datetime
    attempt: int
    status: TaskStatus
    stage: str | None = None
    progress: float | None = None
    message: str | None = None


class TaskEvents(BaseModel):
    events: list[TaskEvent]


class Health(BaseModel):
    status: str = Field(description="ok | unavailable")
    database: str
    artifacts: str = Field("ok", description="ok, or why the artifact store cannot be used.")
    workers: dict[str, int]
    version: str


class BackendInfo(BaseModel):
    name: str
    default: bool
    workers: int


def _seconds(a: dt.datetime | None, b: dt.datetime | None) -> float | None:
    return round((b - a).total_seconds(), 3) if a and b else None


Signer = Callable[[str, str], str]  # (task id, kind) -> signed download link


def task_from_row(
    row: Row, base: str = "/api/v1", sign: Signer | None = None, ttl_seconds: int | None = None
) -> Task:
    """The API view of a task row. With `sign`, result links are signed download links (no
    Bearer header needed); without, the Bearer-authenticated routes."""
    task_id = str(row["id"])
    link = f"{base}/task/{task_id}"
    now = dt.datetime.now(dt.UTC)
    result = None
    stored = results.TaskResult.of_row(row)
    if stored is not None:

        def url(kind: str, bearer_path: str) -> str:
            return sign(task_id, kind) if sign is not None else f"{link}/{bearer_path}"

        result = TaskResult(
            files=[
                FileLink(
                    format=fmt,
                    url=url(fmt, f"result/{fmt}"),
                    bytes=info.bytes,
                    media_type=info.media_type,
                    ready=info.ready,
                )
                for fmt, info in stored.files.items()
            ],
            preview_url=url("preview", "preview"),
            preview_ready=stored.preview.ready,
            turntable_url=url("turntable", "turntable"),
            format_urls={
                fmt: url(fmt, f"result/{fmt}") for fmt in dict.fromkeys([*stored.files, *FORMATS])
            },
            links_expire_at=(
                now.replace(microsecond=0) + dt.timedelta(seconds=ttl_seconds)
                if sign is not None and ttl_seconds is not None
                else None
            ),
            stats=stored.stats,
        )
    error = None
    if row.get("error_code") and row["status"] in ("failed", "queued"):
        error = ErrorBody(code=row["error_code"], message=row["error_message"] or "")
    return Task(
        id=task_id,
        status=row["status"],
        backend=row["backend"],
        progress=float(row["progress"]),
        stage=row.get("stage"),
        queue_position=row.get("queue_position"),
        queue_position_estimated=row.get("queue_position_estimated"),
        attempt=row["attempt"],
        max_attempts=row["max_attempts"],
        created_at=row["created_at"],
        started_at=row.get("started_at"),
        finished_at=row.get("finished_at"),
        timings=Timings(
            queued_s=_seconds(row["created_at"], row.get("started_at")),
            running_s=_seconds(row.get("started_at"), row.get("finished_at")),
            total_s=_seconds(row["created_at"], row.get("finished_at") or now),
            generate_s=stored.timings.generate_s if stored else None,
        ),
        options=row["options"],
        error=error,
        result=result,
        batch_id=row.get("batch_id"),
        expired_at=row.get("expired_at"),
        credits_reserved=row.get("credits_reserved") or 0,
        credits_charged=row.get("credits_charged") or 0,
        links={
            "self": link,
            "events": f"{link}/events",
            "stream": f"{link}/stream",
            "cancel": f"{link}/cancel",
        },
    )
