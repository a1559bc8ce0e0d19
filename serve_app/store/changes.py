"""Task-change notifications for event streams: one PostgreSQL LISTEN connection per process
(an ingress replica), fanned out to that process's subscribers with asyncio.

The `tasks` trigger sends `pg_notify('photo3d_task', {"task_id", "account_id"})` (migration
0004) on every insert and update. A
subscriber to a task id is woken on each of its changes and then reads the task itself; nothing
polls the database per client. After the listening connection is (re)established every
subscriber is woken once, so a change made while it was down is not missed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator

import psycopg

from serve_app.store.listen import TASK_CHANNEL as CHANNEL

log = logging.getLogger(__name__)


def task_id_of(payload: str) -> str:
    """The task id a notification names (JSON since migration 0004; a bare id before)."""
    if payload.startswith("{"):
        with contextlib.suppress(ValueError, AttributeError):
            return str(json.loads(payload).get("task_id", ""))
        return ""
    return payload


class Subscription:
    """One stream's view of a task's changes."""

    def __init__(self) -> None:
        self._changed = asyncio.Event()

    def notify(self) -> None:
        self._changed.set()

    async def wait(self, timeout: float) -> bool:
        """True when the task changed since the last wait, False after `timeout` seconds."""
        try:
            async with asyncio.timeout(timeout):
                await self._changed.wait()
        except TimeoutError:
            return False
        self._changed.clear()
        return True


class TaskChanges:
    """The LISTEN connection and its subscribers; started on first use in the running loop."""

    def __init__(self, url: str, *, retry_seconds: float = 1.0) -> None:
        self.url = url
        self.retry_seconds = retry_seconds
        self._subscribers: dict[str, set[Subscription]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: asyncio.Task[None] | None = None
        self.listening = False

    @contextlib.asynccontextmanager
    async def subscribe(self, task_id: str) -> AsyncIterator[Subscription]:
        """Be woken on each change of `task_id` while the block runs."""
        self._ensure_listening()
        subscription = Subscription()
        self._subscribers.setdefault(task_id, set()).add(subscription)
        try:
            yield subscription
        finally:
            waiting = self._subscribers.get(task_id)
            if waiting is not None:
                waiting.discard(subscription)
                if not waiting:
                    del self._subscribers[task_id]

    @property
    def subscriber_count(self) -> int:
        return sum(len(s) for s in self._subscribers.values())

    def _ensure_listening(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new event loop (tests): the old one's state is gone
            self._loop, self._listener, self._subscribers = loop, None, {}
        if self._listener is None or self._listener.done():
            self._listener = loop.create_task(self._listen(), name="photo3d-task-changes")

    def _wake(self, task_ids: list[str] | None = None) -> None:
        for task_id in self._subscribers if task_ids is None else task_ids:
            for subscription in self._subscribers.get(task_id, ()):
                subscription.notify()

    async def _listen(self) -> None:
        delay = self.retry_seconds
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self.url, autocommit=True, connect_timeout=5
                )
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.listening, delay = True, self.retry_seconds
                    self._wake()  # whatever changed while nobody listened
                    async for note in conn.notifies():
                        self._wake([task_id_of(note.payload)])
            except psycopg.Error as exc:
                log.warning("task-change listener lost its connection: %s", type(exc).__name__)
            finally:
                self.listening = False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def close(self) -> None:
        """Stop listening (replica shutdown)."""
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
            self._listener = None
