"""The worker engine: the claim loop. Claim a task, run a backend, package what it made, finish
with the fencing token; a heartbeat keeps the lease and a timer runs the housekeeping. The
generator deployment is a thin shim around it; tests drive it directly."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from queue import Empty, Full, Queue
from typing import Any

from PIL import Image

from serve_app import artifact_keys, logs, metrics
from serve_app.accounts import Accounts
from serve_app.artifacts import ArtifactStore
from serve_app.backends.base import Backend, GenerationOptions
from serve_app.errors import InvalidInput, Photo3DError, ServiceUnavailable
from serve_app.housekeeping import Housekeeping
from serve_app.images import load_stored_input
from serve_app.packaging import package_asset, store_format, store_preview
from serve_app.results import ResultTimings, StoredFile, TaskResult
from serve_app.store.tasks import Claim, TaskQueue

log = logging.getLogger(__name__)

# Errors that retrying cannot fix: the input or the options are the problem.
PERMANENT_ERRORS: tuple[type[Photo3DError], ...] = (InvalidInput,)

# Issue 11: results waiting for the worker's preview thread (their preview, then the formats
# asked for besides GLB). Past this many (tasks finishing faster than that thread keeps up), the
# rest is left to be made on first request.
PREVIEW_BACKLOG = 16
# The preview thread runs at a lower CPU priority than the claim loop and the generation.
PREVIEW_NICENESS = 10


def new_worker_id(backend: str) -> str:
    """A readable id for this worker process: backend, host, pid and a random suffix."""
    return f"{backend}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass
class _Attempt:
    """Progress of the attempt in hand, shared between the backend and the heartbeat."""

    claim: Claim
    started: float = field(default_factory=time.monotonic)
    progress: float = 0.0
    stage: str = "starting"
    owned: bool = True
    done: threading.Event = field(default_factory=threading.Event)


class Worker:
    """Claims tasks for one backend and runs them, one at a time."""

    def __init__(
        self,
        *,
        queue: TaskQueue,
        artifacts: ArtifactStore,
        backend: Backend,
        heartbeat_seconds: float,
        poll_seconds: float,
        task_timeout_seconds: float,
        worker_id: str | None = None,
        exit_process: Callable[[int], None] = os._exit,
        retention_seconds: float = 0,
        accounts: Accounts | None = None,
        rate_window_seconds: int = 60,
        after_success_files: str = "eager",
    ) -> None:
        self.queue = queue
        self.artifacts = artifacts
        self.backend = backend
        self.heartbeat_seconds = heartbeat_seconds
        self.poll_seconds = poll_seconds
        self.task_timeout_seconds = task_timeout_seconds
        self.worker_id = worker_id or new_worker_id(backend.name)
        self.exit_process = exit_process
        # Only a real replica exit needs to wait for the metrics reporter; tests inject theirs.
        self.flush_metrics = exit_process is os._exit
        self.housekeeping = Housekeeping(
            queue=queue,
            artifacts=artifacts,
            accounts=accounts,
            recover_every=poll_seconds,
            retention_seconds=retention_seconds,
            rate_window_seconds=rate_window_seconds,
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._current: _Attempt | None = None
        # Issue 11: previews render on a thread of their own, after the task has succeeded,
        # so the claim loop takes the next task at once (see _preview_loop).
        self._previews: Queue[tuple[Claim, dict[str, Any], dict[str, Any] | None]] = Queue(
            maxsize=PREVIEW_BACKLOG
        )
        self._preview_thread: threading.Thread | None = None
        # Issue 11: "on_request" leaves the preview and the extra formats to their first fetch.
        self.after_success_files = after_success_files
        self.tasks_done = 0
        self.last_error: str | None = None

    # --- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        """Run the claim loop, the presence beat that /health reads and the housekeeping timer,
        each in a background thread."""
        self._thread = threading.Thread(target=self.run_forever, name="photo3d-worker", daemon=True)
        self._thread.start()
        threading.Thread(target=self._presence, name="photo3d-presence", daemon=True).start()
        self._preview_thread = threading.Thread(
            target=self._preview_loop, name="photo3d-previews", daemon=True
        )
        self._preview_thread.start()
        threading.Thread(
            target=self.housekeeping.run_until,
            args=(self._stop,),
            name="photo3d-housekeeping",
            daemon=True,
        ).start()

    def _presence(self) -> None:
        """Say 'alive' every heartbeat, also while a long generation holds the claim loop."""
        while not self._stop.is_set():
            try:
                self.queue.register_worker(
                    self.worker_id, self.backend.name, socket.gethostname(), os.getpid()
                )
            except Photo3DError as exc:
                self.last_error = exc.message
            self._stop.wait(self.heartbeat_seconds)

    def stop(self, timeout: float | None = None) -> None:
        """Stop claiming; wait up to `timeout` for the task in hand to finish."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._preview_thread is not None:  # the preview being rendered; the rest on request
            self._preview_thread.join(min(timeout, 5.0) if timeout is not None else 5.0)
        with contextlib.suppress(Photo3DError):
            self.queue.unregister_worker(self.worker_id)
        self.queue.close()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def busy(self) -> bool:
        return self._current is not None

    def run_forever(self) -> None:
        """Claim and run tasks until stopped; database outages are waited out."""
        while not self._stop.is_set():
            try:
                if not self.run_once():
                    # Only this backend's tasks end the wait (issue 11: idle means idle).
                    self.queue.wait_for_work(self.poll_seconds, [self.backend.name])
            except Photo3DError as exc:
                self.last_error = exc.message
                log.warning("worker %s: %s", self.worker_id, exc.message)
                self._stop.wait(min(self.poll_seconds, 2.0))
            except Exception:  # keep the loop alive; the replica's health check reports it
                log.exception("worker %s: unexpected error", self.worker_id)
                self._stop.wait(min(self.poll_seconds, 2.0))

    def run_once(self) -> bool:
        """Claim one task and run it; False when there was nothing to do."""
        claim = self.queue.claim(self.worker_id, [self.backend.name])
        if claim is None:
            return False
        metrics.task_claimed(self.backend.name, claim.attempt, claim.queue_wait_seconds)
        self.process(claim)
        return True

    # --- one task ----------------------------------------------------------------------
    def process(self, claim: Claim) -> None:
        """Run one claimed attempt to its end: success, failure or lost ownership."""
        with logs.context(
            task_id=str(claim.id),
            attempt=claim.attempt,
            account_id=claim.account_id,
            backend=self.backend.name,
        ):
            self._process(claim)

    def _process(self, claim: Claim) -> None:
        log.info("task %s attempt %s started", claim.id, claim.attempt)
        attempt = _Attempt(claim)
        self._current = attempt
        beat = threading.Thread(target=self._heartbeat, args=(attempt, logs.current()), daemon=True)
        beat.start()
        prefix = artifact_keys.attempt_prefix(claim.id, claim.attempt)
        try:
            result = self._generate(attempt)
            if attempt.owned and self._while_db_returns(lambda: self.queue.succeed(claim, result)):
                self.tasks_done += 1
                metrics.task_finished(self.backend.name, "succeeded")
                log.info("task %s attempt %s succeeded", claim.id, claim.attempt)
                self._queue_after_success(claim, result)
            else:
                metrics.task_finished(self.backend.name, "lost", "lease_lost")
                # A newer attempt, a cancel or a stall recovery owns the task: our files go.
                log.warning(
                    "task %s attempt %s lost its lease; result dropped", claim.id, claim.attempt
                )
                self.artifacts.delete_prefix(prefix)
        except Exception as exc:
            self._record_failure(attempt, exc)
            self.artifacts.delete_prefix(prefix)
        finally:
            attempt.owned = False
            attempt.done.set()
            self._current = None
            beat.join(timeout=self.heartbeat_seconds + 5)

    # --- previews and extra formats (issue 11: off the claim loop) -----------------------
    def _queue_after_success(self, claim: Claim, result: dict[str, Any]) -> None:
        """Hand the preview and the formats still to convert to the preview thread, so the
        next task is claimed at once. A worker driven without start() (tests, tools) makes
        them here; with the backlog full they are left to be made on first request."""
        pending_formats = any(not f.get("ready", True) for f in result["files"].values())
        if result["preview"].get("ready", True) and not pending_formats:
            return  # the backend made the preview, and only the GLB was asked for
        if self.after_success_files == "on_request":
            return  # each is made when first fetched (PHOTO3D_AFTER_SUCCESS_FILES)
        if self._preview_thread is None:
            self._after_success(claim, result)
            return
        try:
            self._previews.put_nowait((claim, result, logs.current()))
        except Full:
            log.info("task %s: preview backlog full; preview and formats made on request", claim.id)

    def _preview_loop(self) -> None:
        """Render queued previews and convert queued formats, one task at a time, at a lower
        CPU priority than generation."""
        with contextlib.suppress(OSError, AttributeError):  # Linux: the priority of a thread
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), PREVIEW_NICENESS)
        while not self._stop.is_set():
            try:
                claim, result, context = self._previews.get(timeout=0.5)
            except Empty:
                continue
            with logs.context(**(context or {})):
                self._after_success(claim, result)

    def _after_success(self, claim: Claim, result: dict[str, Any]) -> None:
        """What follows a task's success: its preview first (the page shows it), then each
        format asked for besides GLB."""
        self._render_preview(claim, result)
        self._convert_formats(claim, result)

    def _convert_formats(self, claim: Claim, result: dict[str, Any]) -> None:
        """Convert and store each format still to make, marking each ready as it is stored;
        one that fails or is not reached (the process died) is made when first asked for."""
        pending = {n: f for n, f in result["files"].items() if not f.get("ready", True)}
        if not pending:
            return
        try:
            glb = self.artifacts.get(result["files"]["glb"]["key"])
        except Exception:
            log.warning("task %s: GLB not readable; formats made on request", claim.id)
            return
        for fmt, raw in pending.items():
            file = StoredFile.model_validate(raw)
            try:
                if self.artifacts.exists(file.key):  # made on a request meanwhile
                    size: int | None = self.artifacts.size(file.key)
                else:
                    size = store_format(self.artifacts, file, fmt, glb, self.backend.name).bytes
                if not self.queue.result_file_ready(claim.id, claim.attempt, fmt, size or 0):
                    self.artifacts.delete_prefix(file.key)  # the task was deleted meanwhile
                    return
            except Exception:
                log.warning("task %s: %s not converted; it is made on request", claim.id, fmt)

    def _render_preview(self, claim: Claim, result: dict[str, Any]) -> None:
        """Render the preview after the task has succeeded, so it never delays the result; if
        this fails or the process dies first, the preview is rendered when first asked for."""
        shown = result["preview"]
        if shown.get("ready", True):
            return
        try:
            glb = self.artifacts.get(result["files"]["glb"]["key"])
            stored = store_preview(self.artifacts, shown["key"], None, glb, self.backend.name)
            self.queue.preview_ready(claim, stored.bytes or 0)
        except Exception:
            log.warning("task %s: preview not rendered; it renders on request", claim.id)

    def _while_db_returns(self, finish: Callable[[], bool]) -> bool:
        """Run a finishing statement, retrying through a short database outage: the lease may
        still hold, and a finished generation is worth a few seconds' wait."""
        deadline = time.monotonic() + self.queue.lease_seconds
        while True:
            try:
                return finish()
            except ServiceUnavailable:
                if time.monotonic() > deadline or self._stop.is_set():
                    raise
                time.sleep(1.0)

    def _handle_hang(self, attempt: _Attempt, seconds: float) -> None:
        """A generation past its timeout cannot be interrupted from Python (a CUDA kernel or a
        mesh extraction that never returns): record why, then end the whole process so Serve
        replaces the replica. The task is retried, or fails after max_attempts."""
        claim = attempt.claim
        log.error(
            "task %s attempt %s hung for %.0f s; restarting the replica",
            claim.id,
            claim.attempt,
            seconds,
        )
        metrics.watchdog_kill(self.backend.name)
        if attempt.owned:
            attempt.owned = False
            with contextlib.suppress(Photo3DError):
                row = self.queue.fail(
                    claim,
                    code="generation_timeout",
                    permanent=False,
                    message=f"the generation ran longer than {self.task_timeout_seconds:.0f} s "
                    f"(attempt {claim.attempt} of {claim.max_attempts}); the worker "
                    "was restarted",
                )
                self._count_failure(row, "generation_timeout")
        # Give Ray's metrics reporter one round to ship the kill before the process goes (the
        # generation is already hung; a few more seconds change nothing for the user).
        time.sleep(min(metrics.report_interval_seconds() * 1.5, 20.0) if self.flush_metrics else 0)
        self.exit_process(70)

    def _count_failure(self, row: dict[str, Any] | None, code: str) -> None:
        """Count a failed attempt as final (`failed`) or to be retried (`retrying`)."""
        if row is None:
            metrics.task_finished(self.backend.name, "lost", "lease_lost")
        else:
            status = "failed" if row["status"] == "failed" else "retrying"
            metrics.task_finished(self.backend.name, status, code)

    def _generate(self, attempt: _Attempt) -> dict[str, Any]:
        """Run the backend on the claim's photos and package what it made; returns the result
        JSON to store."""
        claim = attempt.claim
        options = GenerationOptions.model_validate(claim.options)
        images: list[Image.Image] = [load_stored_input(self.artifacts.get(k)) for k in claim.inputs]

        backend = self.backend.name
        stage_started = [time.monotonic()]

        def progress(fraction: float, stage: str) -> None:
            # Generation is 90% of the bar; exports take the rest.
            attempt.progress = max(0.0, min(1.0, fraction)) * 0.9
            if stage != attempt.stage:  # time spent in each stage the backend reports
                now = time.monotonic()
                metrics.generation_seconds(backend, attempt.stage, now - stage_started[0])
                stage_started[0] = now
            attempt.stage = stage

        def on_stage(stage: str) -> None:
            attempt.stage = stage

        progress(0.0, "loading")
        t0 = time.monotonic()
        asset = self.backend.generate(images, options, progress)
        t_generate = time.monotonic() - t0
        metrics.generation_seconds(backend, attempt.stage, time.monotonic() - stage_started[0])
        metrics.generation_seconds(backend, "total", t_generate)

        attempt.progress, attempt.stage = 0.9, "exporting"
        result: TaskResult = package_asset(
            asset,
            options,
            self.artifacts,
            claim.id,
            claim.attempt,
            on_stage=on_stage,
            render_preview=False,
            convert_formats=False,
        )
        result.timings = ResultTimings(
            generate_s=round(t_generate, 3),
            total_s=round(time.monotonic() - attempt.started, 3),
        )
        result.worker_id = self.worker_id
        return result.to_json()

    def _record_failure(self, attempt: _Attempt, exc: Exception) -> None:
        claim = attempt.claim
        if isinstance(exc, Photo3DError):
            code, message = exc.code, exc.message
            permanent = isinstance(exc, PERMANENT_ERRORS)
        else:
            code, message, permanent = "backend_error", f"{type(exc).__name__}: {exc}", False
        log.warning(
            "task %s attempt %s failed (%s): %s",
            claim.id,
            claim.attempt,
            code,
            message,
            exc_info=not isinstance(exc, Photo3DError),
        )
        if attempt.owned:
            row = self.queue.fail(claim, code=code, message=message, permanent=permanent)
            self._count_failure(row, code)
        else:
            metrics.task_finished(self.backend.name, "lost", "lease_lost")

    def _heartbeat(self, attempt: _Attempt, context: dict[str, Any] | None = None) -> None:
        """Keep the lease while the attempt runs; push progress; notice cancels, lost leases
        and hangs. Progress goes out within a second; the lease is renewed at least every
        heartbeat_seconds."""
        with logs.context(**(context or {})):
            self._beat(attempt)

    def _beat(self, attempt: _Attempt) -> None:
        tick = min(1.0, self.heartbeat_seconds)
        sent: tuple[float, str] | None = None
        sent_at = 0.0
        while not attempt.done.wait(tick if sent is not None else 0):
            now = time.monotonic()
            state = (round(attempt.progress, 3), attempt.stage)
            if state != sent or now - sent_at >= self.heartbeat_seconds:
                try:
                    owned = self.queue.heartbeat(attempt.claim, progress=state[0], stage=state[1])
                except Photo3DError as exc:
                    log.warning("heartbeat failed for task %s: %s", attempt.claim.id, exc.message)
                    owned = True  # the lease may still hold; retry on the next tick
                else:
                    sent, sent_at = state, now
                if not owned:
                    attempt.owned = False  # canceled, or the lease was recovered elsewhere
                    return
            if now - attempt.started > self.task_timeout_seconds:
                self._handle_hang(attempt, now - attempt.started)
                return
