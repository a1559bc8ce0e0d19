"""Task routes: submit, read, timeline, live stream, cancel, delete, list."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from serve_app.api.deps import ERRORS, AccountDep, ServicesDep
from serve_app.api.parsing import GENERATE_BODY, parse_generate
from serve_app.api.schemas import Task, TaskEvent, TaskEvents, TaskList, task_from_row
from serve_app.errors import Photo3DError
from serve_app.service import Services
from serve_app.store.db import Row
from serve_app.store.tasks import TERMINAL

router = APIRouter(prefix="/api/v1", responses=ERRORS, tags=["tasks"])


def view(services: Services, account: str, row: Row) -> Task:
    """The task as its owner sees it, result links signed (fetchable without a Bearer header)."""
    return task_from_row(
        row,
        sign=services.downloads.linker(account),
        ttl_seconds=services.downloads.ttl_seconds,
    )


@router.post(
    "/generate",
    status_code=202,
    response_model=Task,
    openapi_extra=GENERATE_BODY,
    summary="Queue a photo-to-3D generation",
)
async def generate(
    request: Request,
    services: ServicesDep,
    account: AccountDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JSONResponse:
    """Accept one or more photos of one object; answers 202 with the queued task."""
    photos, options = await parse_generate(request, services)
    row, created = await run_in_threadpool(
        services.submit, account, photos, options, idempotency_key=idempotency_key
    )
    task = view(services, account, row)
    return JSONResponse(
        task.model_dump(mode="json"),
        status_code=202 if created else 200,
        headers={"Location": task.links["self"]},
    )


@router.get("/task/{task_id}", response_model=Task, summary="Status, progress and result links")
def get_task(task_id: str, services: ServicesDep, account: AccountDep) -> Task:
    return view(services, account, services.get_task(account, task_id))


@router.get("/task/{task_id}/events", response_model=TaskEvents, summary="The task's timeline")
def get_task_events(task_id: str, services: ServicesDep, account: AccountDep) -> TaskEvents:
    return TaskEvents(events=[TaskEvent(**e) for e in services.task_events(account, task_id)])


@router.get(
    "/task/{task_id}/stream",
    summary="Server-sent events: the task on every change until it ends",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def stream_task(
    task_id: str, request: Request, services: ServicesDep, account: AccountDep
) -> StreamingResponse:
    row = await run_in_threadpool(services.get_task, account, task_id)

    async def events() -> AsyncIterator[str]:
        last: str | None = None
        last_event_id = 0
        idle = 0.0
        current = row
        while True:
            try:
                timeline = await run_in_threadpool(
                    services.task_events, account, task_id, last_event_id
                )
            except Photo3DError as exc:  # deleted meanwhile
                yield f"event: error\ndata: {json.dumps(exc.to_dict())}\n\n"
                return
            for event in timeline:
                last_event_id = event["id"]
                data = TaskEvent(**event).model_dump_json()
                yield f"id: {last_event_id}\nevent: timeline\ndata: {data}\n\n"
            # Compared without signatures (they change every second); sent with them.
            body = task_from_row(current).model_dump_json(exclude={"timings"})
            if body != last:
                last, idle = body, 0.0
                yield f"event: task\ndata: {view(services, account, current).model_dump_json()}\n\n"
            if current["status"] in TERMINAL or await request.is_disconnected():
                return
            await asyncio.sleep(0.5)
            idle += 0.5
            if idle >= 15:
                idle = 0.0
                yield ": keep-alive\n\n"
            try:
                current = await run_in_threadpool(services.get_task, account, task_id)
            except Photo3DError as exc:
                yield f"event: error\ndata: {json.dumps(exc.to_dict())}\n\n"
                return

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post(
    "/task/{task_id}/cancel", response_model=Task, summary="Cancel a queued or running task"
)
def cancel_task(task_id: str, services: ServicesDep, account: AccountDep) -> Task:
    return view(services, account, services.cancel_task(account, task_id))


@router.delete("/task/{task_id}", status_code=204, summary="Delete a task and its files")
def delete_task(task_id: str, services: ServicesDep, account: AccountDep) -> Response:
    services.delete_task(account, task_id)
    return Response(status_code=204)


@router.get("/tasks", response_model=TaskList, summary="Your tasks, newest first")
def list_tasks(
    services: ServicesDep,
    account: AccountDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    status: Annotated[str | None, Query(max_length=20)] = None,
    batch_id: Annotated[str | None, Query(max_length=200)] = None,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> TaskList:
    rows, next_cursor = services.list_tasks(
        account, limit=limit, status=status, batch_id=batch_id, cursor=cursor
    )
    return TaskList(tasks=[view(services, account, r) for r in rows], next_cursor=next_cursor)
