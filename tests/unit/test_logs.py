"""Structured log lines: JSON, with the request, task and account they concern."""

from __future__ import annotations

import contextvars
import io
import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from serve_app import logs


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Leave the `serve_app` logger as other tests expect it (propagating, no handler)."""
    logger = logging.getLogger("serve_app")
    handlers, propagate, level = list(logger.handlers), logger.propagate, logger.level
    yield
    logger.handlers[:] = handlers
    logger.propagate, logger.level = propagate, level


def capture(fmt: str = "json") -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    logs.configure(fmt)
    logger = logging.getLogger("serve_app.test")
    handler = next(h for h in logging.getLogger("serve_app").handlers if h.name == "photo3d")
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    return logger, stream


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_lines_are_json_with_the_context_of_their_request_and_task() -> None:
    logger, stream = capture()
    with logs.context(request_id="req-1"):
        logger.info("accepted")
        with logs.context(task_id="t-1", attempt=2, account_id="acme"):
            logger.warning("failed: %s", "boom")
    logger.info("outside")
    first, second, third = lines(stream)
    assert first["message"] == "accepted" and first["request_id"] == "req-1"
    assert "task_id" not in first
    assert second["level"] == "WARNING" and second["message"] == "failed: boom"
    assert (second["request_id"], second["task_id"], second["attempt"], second["account_id"]) == (
        "req-1",
        "t-1",
        2,
        "acme",
    )
    assert "request_id" not in third


def test_an_account_bound_in_a_worker_thread_reaches_the_requests_later_lines() -> None:
    # FastAPI runs sync dependencies in a thread with a copy of the context.
    logger, stream = capture()
    with logs.context(request_id="req-2"):
        ctx = contextvars.copy_context()
        with ThreadPoolExecutor(1) as pool:
            pool.submit(ctx.run, logs.bind, account_id="acme").result()
        logger.info("done")
    assert lines(stream)[0]["account_id"] == "acme"


def test_exceptions_stay_on_one_line() -> None:
    logger, stream = capture()
    try:
        raise ValueError("bad")
    except ValueError:
        logger.exception("crashed")
    (line,) = lines(stream)
    assert "ValueError: bad" in line["exc"]


def test_text_format_for_terminals() -> None:
    logger, stream = capture("text")
    with logs.context(task_id="t-9"):
        logger.info("hello")
    assert "hello" in stream.getvalue() and "task_id=t-9" in stream.getvalue()
