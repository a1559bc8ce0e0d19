"""Structured logs: one JSON object per line, carrying the request id, task id, attempt and
account id of whatever the line concerns.

Serve's own loggers are switched to JSON by `logging_config` in serve_config.yaml; this module
does the same for photo3d's loggers (`serve_app.*`, the worker, the CLI). The context travels in
a contextvar holding a mutable dict, so a FastAPI dependency running in a worker thread (which
sees a copy of the context) can still add the account id the middleware's later lines carry.

What is never logged: API keys, the Authorization header, secrets from the environment, image
bytes. Log calls pass ids and codes, never request bodies or headers.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

CONTEXT_FIELDS = ("request_id", "task_id", "attempt", "account_id", "backend", "worker_id")

_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "photo3d_log_context", default=None
)

LOGGER_NAME = "serve_app"


def current() -> dict[str, Any]:
    """The log context of this request or task (empty outside one)."""
    return _context.get() or {}


@contextlib.contextmanager
def context(**fields: Any) -> Iterator[dict[str, Any]]:
    """Add fields to every photo3d log line inside the block (nested blocks add to outer ones)."""
    merged = {**current(), **{k: v for k, v in fields.items() if v is not None}}
    token = _context.set(merged)
    try:
        yield merged
    finally:
        _context.reset(token)


def bind(**fields: Any) -> None:
    """Add fields to the context of the enclosing `context()` block (no-op outside one)."""
    found = _context.get()
    if found is not None:
        found.update({k: v for k, v in fields.items() if v is not None})


class ContextFilter(logging.Filter):
    """Copies the log context onto each record (without overwriting explicit `extra=`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in current().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    """{"ts", "level", "logger", "message", <context fields>, "exc"} on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in CONTEXT_FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                line[key] = str(value) if not isinstance(value, int | float) else value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Human lines for a terminal, with the context fields appended."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        extra = " ".join(
            f"{key}={getattr(record, key)}"
            for key in CONTEXT_FIELDS
            if getattr(record, key, None) is not None
        )
        text = super().format(record)
        return f"{text} [{extra}]" if extra else text


def configure(fmt: str = "json", level: int = logging.INFO, *, root: bool = False) -> None:
    """Send photo3d's log lines to stderr as JSON (or text). With root=True every logger's lines
    (libraries' too) go through the same handler, as the CLI wants; in a Ray replica only
    `serve_app.*` is taken over, and Ray's and Serve's own loggers keep their handlers."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    handler.set_name("photo3d")
    target = logging.getLogger() if root else logging.getLogger(LOGGER_NAME)
    for existing in list(target.handlers):
        if existing.get_name() == "photo3d" or root:
            target.removeHandler(existing)
    target.addHandler(handler)
    target.setLevel(level)
    if not root:
        target.propagate = False
