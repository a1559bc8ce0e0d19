"""Task routes: submit, read, timeline, live stream, cancel, delete, list."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from serve_app.api.deps import ERRORS, AccountDep, ServicesDep
from serve_app.api.limits import HeldStream, has_control_characters
from serve_app.api.parsing import parse_generate
from serve_app.api.schemas import Task, TaskEvent, TaskEvents, TaskList, task_from_row
from serve_app.errors import InvalidInput, Photo3DError
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
    summary="Queue a photo-to-3D generation",
)
async def generate(
    request: Request,
    services: ServicesDep,
    account: AccountDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JSONResponse:
    """Accept one or more photos of one object; answers 202 with the queued task."""
    if idempotency_key is not None and has_control_characters(idempotency_key):
        raise InvalidInput(
            "the Idempotency-Key header contains control characters", code="invalid_characters"
        )
    with request.app.state.uploads.slot(account):  # bodies and image_url fetches in flight
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
async def get_task(task_id: str, services: ServicesDep, account: AccountDep) -> Response:
    # On the event loop, and serialized once (not validated again against response_model):
    # the most frequent request of all, polled by every client (issue 11).
    task = view(services, account, await services.aget_task(account, task_id))
    return Response(task.model_dump_json(), media_type="application/json")


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
    task_id: str,
    request: Request,
    services: ServicesDep,
    account: AccountDep,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=20)] = None,
) -> StreamingResponse:
    """Timeline events (with ids: reconnect with `Last-Event-ID` to resume after the last one
    seen) and the task itself on each change. Woken by the replica's one task-change listener;
    at most PHOTO3D_MAX_STREAMS_PER_ACCOUNT open streams per account and replica."""
    row = await run_in_threadpool(services.get_task, account, task_id)
    after = int(last_event_id) if last_event_id and last_event_id.isdigit() else 0
    release = request.app.state.streams.acquire(account)
    changes = services.task_changes

    async def events() -> AsyncIterator[str]:
        last_event, last_body = after, None
        async with changes.subscribe(str(row["id"])) as subscription:
            # Read the task again now that changes wake us: one that ended between the read
            # above and the subscription (a photo refused in milliseconds) sends no more
            # notifications, and the stream would wait for them forever.
            try:
                current = await run_in_threadpool(services.get_task, account, task_id)
            except Photo3DError as exc:
                yield f"event: error\ndata: {json.dumps(exc.to_dict())}\n\n"
                return
            while True:
                try:
                    timeline = await run_in_threadpool(
                        services.task_events, account, task_id, last_event
                    )
                except Photo3DError as exc:  # deleted meanwhile
                    yield f"event: error\ndata: {json.dumps(exc.to_dict())}\n\n"
                    return
                for event in timeline:
                    last_event = event["id"]
                    data = TaskEvent(**event).model_dump_json()
                    yield f"id: {last_event}\nevent: timeline\ndata: {data}\n\n"
                task = task_from_row(current)
                body = task.model_dump_json(exclude={"timings"})
                if body != last_body:
                    last_body = body
                    # Compared without signatures (they change every second); sent with them.
                    shown = view(services, account, current).model_dump_json()
                    yield f"event: task\ndata: {shown}\n\n"
                if current["status"] in TERMINAL:
                    return
                while not await subscription.wait(15):
                    yield ": keep-alive\n\n"
                try:
                    current = await run_in_threadpool(services.get_task, account, task_id)
                except Photo3DError as exc:
                    yield f"event: error\ndata: {json.dumps(exc.to_dict())}\n\n"
                    return

    return HeldStream(
        events(),
        release=release,
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
