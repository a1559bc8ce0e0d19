"""LISTEN/NOTIFY: one dedicated connection per listener, reopened after a failure.

NOTIFY is a hint, never the truth: a listener that misses one (connection lost, listener not
yet started) must still find the work by polling, so `wait` returns after `timeout` whatever
happens, and a broken connection only turns the wait into a plain sleep.

Channels the schema notifies on (see the trigger in migrations 0001 and 0004):
- `photo3d_queued`: payload is the backend name; sent when a task becomes queued.
- `photo3d_task`: payload is JSON `{"task_id": "...", "account_id": "..."}`; sent on every
  insert or update of a task (event streams follow it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable

import psycopg

log = logging.getLogger(__name__)

QUEUED_CHANNEL = "photo3d_queued"
TASK_CHANNEL = "photo3d_task"


class Listener:
    """LISTEN on some channels over a connection of its own (not from the pool: a listening
    connection is held for its lifetime)."""

    def __init__(self, url: str, channels: Iterable[str], *, connect_timeout: int = 5) -> None:
        self.url = url
        self.channels = tuple(channels)
        self.connect_timeout = connect_timeout
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None
        self._lock = threading.Lock()

    def _connection(self) -> psycopg.Connection[tuple[object, ...]]:
        if self._conn is None or self._conn.closed:
            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=self.connect_timeout)
            for channel in self.channels:
                conn.execute(f'LISTEN "{channel}"')  # channel names are our constants
            self._conn = conn
        return self._conn

    def wait(self, timeout: float) -> list[tuple[str, str]]:
        """(channel, payload) of the notifications that arrive within `timeout` seconds: returns
        at the first one, or empty-handed when the time is up. A database outage is waited out
        as a sleep of `timeout`, and the connection reopened on the next call."""
        with self._lock:
            started = time.monotonic()
            try:
                conn = self._connection()
                return [
                    (n.channel, n.payload) for n in conn.notifies(timeout=timeout, stop_after=1)
                ]
            except psycopg.Error as exc:
                log.debug("listener on %s: %s", self.channels, type(exc).__name__)
                self._close()
            time.sleep(max(0.0, timeout - (time.monotonic() - started)))
            return []

    def _close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    def close(self) -> None:
        """Stop listening and drop the connection."""
        with self._lock:
            self._close()
