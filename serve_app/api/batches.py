"""Batch routes: bulk conversion jobs as the API and the web page see them."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, Field

from serve_app.api.deps import ERRORS, AccountDep, ServicesDep

router = APIRouter(prefix="/api/v1", responses=ERRORS, tags=["batches"])


class BatchCounts(BaseModel):
    queued: int
    running: int
    succeeded: int
    failed: int
    canceled: int


class Batch(BaseModel):
    id: str
    status: str = Field(description="running | completed | failed | stopped (the job's state)")
    source: str = Field(description="The folder, manifest or prefix the job read.")
    options: dict[str, Any]
    created_at: dt.datetime
    finished_at: dt.datetime | None = None
    total: int | None = Field(None, description="Items in the source; null while counting.")
    counts: BatchCounts = Field(description="The batch's tasks by status.")
    rejected: int = Field(description="Items refused before queueing (unreadable or bad photo).")
    failures: dict[str, int] = Field(description="Failed and rejected items by error code.")
    progress: float = Field(description="Items ended (any way) / items, 0..1.")
    photos_per_minute: float | None = None
    eta_seconds: float | None = Field(None, description="At the current rate; null if unknown.")
    links: dict[str, str]


class BatchList(BaseModel):
    batches: list[Batch]
    next_cursor: str | None = Field(None, description="Pass as ?cursor= for the next page.")


def _batch(summary: Any) -> Batch:
    body = asdict(summary)
    return Batch(
        **body,
        links={
            "self": f"/api/v1/batches/{summary.id}",
            "tasks": f"/api/v1/tasks?batch_id={summary.id}",
        },
    )


@router.get("/batches", response_model=BatchList, summary="Your bulk conversion batches")
def list_batches(
    services: ServicesDep,
    account: AccountDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> BatchList:
    summaries, next_cursor = services.batches.list(account, limit=limit, cursor=cursor)
    return BatchList(batches=[_batch(s) for s in summaries], next_cursor=next_cursor)


@router.get("/batches/{batch_id}", response_model=Batch, summary="One batch's progress")
def get_batch(
    services: ServicesDep,
    account: AccountDep,
    batch_id: Annotated[str, Path(max_length=200)],
) -> Batch:
    return _batch(services.batches.get(account, batch_id))
