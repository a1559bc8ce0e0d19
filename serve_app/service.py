"""Service logic between the HTTP surface and the store: accept a generation (validate every
photo and option, store the photos, queue the task), read tasks back, cancel, delete, serve
result files, and report readiness. Each API handler calls one method here."""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from serve_app import artifact_keys, exports, metrics, preview
from serve_app.accounts import Accounts, Principal
from serve_app.artifacts import ArtifactStore, open_artifact_store
from serve_app.backends import available_backends
from serve_app.backends.base import GenerationOptions
from serve_app.batches import Batches
from serve_app.downloads import REDIRECT_GRACE_SECONDS, DownloadSigner, signer_from_settings
from serve_app.errors import GenerationFailed, Gone, InvalidInput, NotFound, Photo3DError
from serve_app.images import ImageLimits, check_image, stored_suffix
from serve_app.packaging import store_format, store_preview
from serve_app.results import StoredFile, TaskResult
from serve_app.settings import Settings
from serve_app.store.batches import BatchStore
from serve_app.store.changes import TaskChanges
from serve_app.store.db import Database, Row
from serve_app.store.tasks import TERMINAL, ActiveTaskLimitReached, TaskQueue

if TYPE_CHECKING:
    from serve_app.billing import Billing
    from serve_app.webhooks import Webhooks

log = logging.getLogger(__name__)


def parse_options(
    raw: dict[str, Any], settings: Settings, enabled: list[str] | None = None
) -> GenerationOptions:
    """Validate client options; unknown keys and out-of-range values are a 4xx naming the field.
    `enabled` lists the backends this deployment serves (default: every known backend)."""
    try:
        options = GenerationOptions.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "options"
        raise InvalidInput(f"option {where}: {first['msg']}", code="invalid_option") from exc
    backend = options.backend or settings.default_backend
    known = enabled if enabled is not None else list(available_backends(settings))
    if backend not in known:
        raise InvalidInput(
            f"unknown backend {backend!r}; available: {', '.join(sorted(known))}",
            code="unknown_backend",
        )
    return options.model_copy(update={"backend": backend})


@dataclass(frozen=True)
class ArtifactFile:
    """A stored file ready to send: a local path to stream from when the store has one, else
    its bytes a chunk at a time (an S3 object is never held whole in memory)."""

    info: StoredFile
    path: Path | None
    chunks: Iterator[bytes] | None


@dataclass(frozen=True)
class Readiness:
    """What /health reports: the database, live workers per backend, and the verdict."""

    ready: bool
    database: str
    workers: dict[str, int]
    artifacts: str = "ok"  # or why the artifact store cannot be used (bucket, credentials)


@dataclass(frozen=True)
class BackendStatus:
    name: str
    default: bool
    workers: int


@dataclass
class Services:
    """What a process needs to serve requests: settings, database, queue, artifact store."""

    settings: Settings
    db: Database
    queue: TaskQueue
    artifacts: ArtifactStore
    backends: list[str] | None = None  # backends with a generator deployment; None = all

    @classmethod
    def from_settings(cls, settings: Settings, backends: list[str] | None = None) -> Services:
        """Build (but do not connect) the services for these settings."""
        if not settings.database_url:
            raise InvalidInput("DATABASE_URL is not set", code="config_error")
        db = Database(
            settings.database_url,
            min_size=settings.db_pool_min,
            max_size=settings.db_pool_max,
            timeout=settings.db_connect_timeout_s,
        )
        queue = TaskQueue(
            db, lease_seconds=settings.lease_seconds, backoff_seconds=settings.retry_backoff_seconds
        )
        return cls(settings, db, queue, open_artifact_store(settings), backends)

    def close(self) -> None:
        """Release the database pool and any listening connection."""
        self.queue.close()
        self.db.close()

    @cached_property
    def accounts(self) -> Accounts:
        return Accounts(self.db)

    @cached_property
    def task_changes(self) -> TaskChanges:
        """This process's one LISTEN connection for event streams (issue 10)."""
        return TaskChanges(self.db.url)

    @cached_property
    def batches(self) -> Batches:
        return Batches(BatchStore(self.db))

    @cached_property
    def billing(self) -> Billing:
        from serve_app.billing import Billing

        return Billing(self.settings, self.db)

    @cached_property
    def downloads(self) -> DownloadSigner:
        """Signs the download links the API hands out (issue #14)."""
        return signer_from_settings(self.settings)

    # --- #15 integrators -----------------------------------------------------------------
    @cached_property
    def webhooks(self) -> Webhooks:
        """Webhook endpoints of accounts (the dispatcher is started by the ingress)."""
        from serve_app.store.webhooks import WebhookStore
        from serve_app.webhooks import Webhooks

        return Webhooks(WebhookStore(self.db), self.settings)

    # --- generation ----------------------------------------------------------------
    def submit(
        self,
        account_id: str,
        photos: list[bytes],
        raw_options: dict[str, Any],
        *,
        idempotency_key: str | None = None,
        batch_id: str | None = None,
        priority: int = 0,
    ) -> tuple[Row, bool]:
        """Check everything, then store the photos and queue the task; returns (task, created)."""
        if not photos:
            raise InvalidInput("send at least one image", code="missing_image")
        if len(photos) > self.settings.max_images_per_task:
            raise InvalidInput(
                f"at most {self.settings.max_images_per_task} images per task",
                code="too_many_images",
            )
        options = parse_options(raw_options, self.settings, self.backends)
        limits = ImageLimits.from_settings(self.settings)
        for data in photos:  # decoded to refuse what the worker could not read
            check_image(data, limits)
        digest = request_hash(photos, options.model_dump(mode="json"))
        if idempotency_key is not None:
            # A retry must not store its photos again: answer with the original task.
            task_by_key = self.queue.by_idempotency_key(account_id, idempotency_key)
            if task_by_key is not None:
                return check_same_request(task_by_key, digest, idempotency_key), False
        # The active-task limit is checked once, with the insert, under the account's lock (a
        # check here as well cost every accepted request a round trip to spare a refused one
        # its photo's write, issue 11). Billing (off by default): 402 before anything is
        # stored; the reservation itself is taken in the task insert's transaction below.
        quote = (
            self.billing.quote(account_id, options.model_dump(mode="json"))
            if self.settings.billing_enabled
            else None
        )
        task_id = uuid.uuid4()
        keys = [
            artifact_keys.input_key(task_id, i, stored_suffix(data))
            for i, data in enumerate(photos)
        ]
        try:
            for key, data in zip(keys, photos, strict=True):
                self.artifacts.put(key, data)
            row, created = self.queue.submit(
                # checked again, atomically; a bulk job bounds its own items in flight
                max_active=self.settings.max_active_tasks if batch_id is None else None,
                task_id=task_id,
                account_id=account_id,
                backend=str(options.backend),
                options=options.model_dump(mode="json"),
                inputs=keys,
                max_attempts=self.settings.max_attempts,
                priority=priority,
                idempotency_key=idempotency_key,
                batch_id=batch_id,
                request_hash=digest,
                credits=quote.credits if quote else 0,
                meter_event=quote.meter_event if quote else None,
            )
        except ActiveTaskLimitReached as exc:
            self.artifacts.delete_prefix(artifact_keys.inputs_prefix(task_id))
            raise self.accounts.too_many_active(exc.limit) from exc
        except BaseException:
            self.artifacts.delete_prefix(artifact_keys.inputs_prefix(task_id))
            raise
        if not created:
            self.artifacts.delete_prefix(artifact_keys.inputs_prefix(task_id))
            return check_same_request(row, digest, idempotency_key or ""), False
        metrics.task_submitted(str(options.backend))
        log.info(
            "task queued",
            extra={"task_id": str(task_id), "account_id": account_id, "backend": options.backend},
        )
        return self.queue.get(task_id, account_id) or row, True  # with its queue position

    # --- reading -------------------------------------------------------------------
    def get_task(self, account_id: str, task_id: str) -> Row:
        """The task, or NotFound when it does not exist or belongs to another account."""
        return found(self.queue.get(parse_task_id(task_id), account_id), task_id)

    async def aget_task(self, account_id: str, task_id: str) -> Row:
        """get_task on the event loop (GET /task, issue 11)."""
        return found(await self.queue.aget(parse_task_id(task_id), account_id), task_id)

    def task_events(self, account_id: str, task_id: str, after_id: int = 0) -> list[Row]:
        """The task's timeline after event `after_id`, oldest first."""
        row = self.get_task(account_id, task_id)
        return self.queue.events(row["id"], after_id)

    def list_tasks(
        self, account_id: str, *, limit: int, **filters: str | None
    ) -> tuple[list[Row], str | None]:
        """The account's tasks, newest first; filters: status, batch_id, cursor. Returns (rows,
        next_cursor)."""
        return self.queue.list_tasks(account_id, limit=limit, **filters)

    def artifact(self, account_id: str, task_id: str, fmt: str) -> StoredFile:
        """The stored file of one result format ("preview", "turntable", or an output format),
        converting on demand if needed."""
        row = self.get_task(account_id, task_id)
        if row.get("expired_at") is not None:
            raise Gone(
                f"the result of task {task_id} expired and was deleted", code="result_expired"
            )
        result = TaskResult.of_row(row)
        if result is None:
            raise InvalidInput(
                f"task {task_id} has no result yet (status {row['status']})", code="task_not_ready"
            )
        if fmt == "preview":
            if not result.preview.ready and not self.artifacts.exists(result.preview.key):
                # Asked for before the worker rendered it (or the worker died first).
                glb = self.artifacts.get(result.files["glb"].key)
                shown = store_preview(
                    self.artifacts, result.preview.key, None, glb, str(row["backend"])
                )
                self._mark_ready(row, "preview", shown.bytes)
                return shown.as_file()
            return result.preview.as_file()
        if fmt == "turntable":
            # Rendered on first request (a few CPU seconds), then kept beside the preview.
            key = artifact_keys.beside(result.preview.key, "turntable.webp")
            if not self.artifacts.exists(key):
                glb = self.artifacts.get(result.files["glb"].key)
                self.artifacts.put(key, preview.render_turntable(glb))
            return StoredFile(key=key, media_type="image/webp", filename="turntable.webp")
        if fmt in result.files:
            return self._stored_format(row, result, fmt)
        if fmt not in exports.FORMATS:
            raise NotFound(
                f"format {fmt!r} is not available; choose one of "
                f"{', '.join(sorted(set(exports.FORMATS) | set(result.files)))}",
                code="unknown_format",
            )
        # A format not asked for at submit time is made from the GLB now and kept.
        info = exports.FORMATS[fmt]
        glb_key = result.files["glb"].key
        key = artifact_keys.beside(glb_key, info.filename)
        file = StoredFile(key=key, media_type=info.media_type, filename=info.filename)
        if not self.artifacts.exists(key):
            self._convert(file, fmt, glb_key, str(row["backend"]))
        return file

    # --- issue 11: formats asked for besides GLB are stored after `succeeded` ------------------
    def _stored_format(self, row: Row, result: TaskResult, fmt: str) -> StoredFile:
        """A format the task asked for: as stored, or (not converted yet by the worker, or the
        worker died first) converted now, stored where the worker would have, marked ready."""
        file = result.files[fmt]
        if file.ready:
            return file
        if self.artifacts.exists(file.key):  # stored, not marked yet (or the worker died then)
            self._mark_ready(row, fmt, self.artifacts.size(file.key))
            return file
        made = self._convert(file, fmt, result.files["glb"].key, str(row["backend"]))
        self._mark_ready(row, fmt, made.bytes)
        return made

    def _convert(self, file: StoredFile, fmt: str, glb_key: str, backend: str) -> StoredFile:
        try:
            return store_format(self.artifacts, file, fmt, self.artifacts.get(glb_key), backend)
        except GenerationFailed as exc:  # this model cannot be written in that format
            raise InvalidInput(exc.message, code="conversion_failed") from exc

    def _mark_ready(self, row: Row, name: str, size: int | None) -> None:
        """Say in the task that a file made on request is stored (best effort: the file is
        served either way)."""
        try:
            self.queue.result_file_ready(row["id"], int(row["attempt"]), name, size or 0)
        except Photo3DError as exc:
            log.warning("task %s: %s stored, not marked ready: %s", row["id"], name, exc.message)

    def open_artifact(self, account_id: str, task_id: str, fmt: str) -> ArtifactFile:
        """One result file to send: a path to stream from when the store has one, else its
        chunks (a missing object is NotFound here, not a broken stream later)."""
        return self.open_file(self.artifact(account_id, task_id, fmt))

    def open_file(self, info: StoredFile) -> ArtifactFile:
        path = self.artifacts.local_path(info.key)
        if path is not None:
            return ArtifactFile(info, path, None)
        chunks = self.artifacts.iter_chunks(info.key)
        first = next(chunks, b"")

        def stream() -> Iterator[bytes]:
            yield first
            yield from chunks

        return ArtifactFile(info, None, stream())

    def signed_artifact(
        self, account_id: str, task_id: str, kind: str, expires: int, signature: str
    ) -> tuple[ArtifactFile | str, int]:
        """What a signed download link reaches, and the link's seconds left: the file to send
        (local store) or a presigned URL to redirect to (S3). Forbidden when the link was
        altered, Gone when it expired; nothing is looked up before the signature checks out."""
        left = self.downloads.verify(account_id, task_id, kind, expires, signature)
        info = self.artifact(account_id, task_id, kind)
        url = self.artifacts.presigned_url(
            info.key,
            left + REDIRECT_GRACE_SECONDS,
            filename=info.filename,
            media_type=info.media_type,
            inline=kind in ("preview", "turntable"),
        )
        return (url if url is not None else self.open_file(info)), left

    # --- changing ------------------------------------------------------------------
    def cancel_task(self, account_id: str, task_id: str) -> Row:
        """Cancel a queued or running task; the task as it is afterwards."""
        row = self.get_task(account_id, task_id)
        if row["status"] in TERMINAL:
            raise InvalidInput(
                f"task {task_id} already ended ({row['status']})", code="task_finished"
            )
        self.queue.cancel(row["id"], account_id)
        return self.get_task(account_id, task_id)

    def delete_task(self, account_id: str, task_id: str) -> None:
        """Remove a task, its timeline and every file it has."""
        tid = parse_task_id(task_id)
        row = self.queue.delete(tid, account_id)
        if row is None:
            raise NotFound(f"task {task_id} not found", code="task_not_found")
        for prefix in artifact_keys.task_prefixes(tid):
            self.artifacts.delete_prefix(prefix)

    # --- the deployment --------------------------------------------------------------
    def backend_statuses(self) -> list[BackendStatus]:
        """The backends served here, which is the default, and how many workers each has."""
        workers = self.queue.live_workers(self.settings.worker_alive_seconds)
        return [
            BackendStatus(name, name == self.settings.default_backend, workers.get(name, 0))
            for name in sorted(self.backends or available_backends(self.settings))
        ]

    def readiness(self) -> Readiness:
        """Whether this deployment can take work: the database answers, the artifact store can be
        written, and (when required) a worker of the default backend is alive. An outage is a
        verdict, not an error."""
        settings = self.settings
        database, workers = "ok", {}
        try:
            self.db.ping()
            workers = self.queue.live_workers(settings.worker_alive_seconds)
        except Photo3DError:
            database = "unavailable"
        artifacts = "ok"
        try:
            self.artifacts.check()  # a missing bucket or refused credentials is named here
        except Photo3DError as exc:
            artifacts = exc.message
        ready = (
            database == "ok"
            and artifacts == "ok"
            and (
                not settings.health_requires_worker or workers.get(settings.default_backend, 0) > 0
            )
        )
        return Readiness(ready, database, workers, artifacts)

    def account_name(self, principal: Principal) -> str:
        """The caller's account name (its id when the account has no row, as in local mode)."""
        row = self.accounts.get_account(principal.account_id) or {}
        return str(row.get("name", principal.account_id))


def request_hash(photos: list[bytes], options: dict[str, Any]) -> str:
    """sha256 of what a generation request asks for: its photos and its (validated) options."""
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for photo in photos:
        digest.update(hashlib.sha256(photo).digest())
    return digest.hexdigest()


def check_same_request(task: Row, digest: str, idempotency_key: str) -> Row:
    """The task a reused Idempotency-Key names, unless the request differs from the first one
    (then 422: answering with the first task would silently drop this one)."""
    if task.get("request_hash") not in (None, digest):
        raise InvalidInput(
            f"Idempotency-Key {idempotency_key[:64]!r} was already used with a different "
            "request; use a new key for a new request",
            code="idempotency_key_reused",
        )
    return task


def parse_task_id(value: str) -> uuid.UUID:
    """A task id from a URL; anything that is not a UUID is simply not found."""
    try:
        return uuid.UUID(value)
    except ValueError as exc:
        raise NotFound(f"task {value[:64]} not found", code="task_not_found") from exc


def found(row: Row | None, task_id: str) -> Row:
    """The task's row, or NotFound (also for another account's task: it is not theirs to see)."""
    if row is None:
        raise NotFound(f"task {task_id} not found", code="task_not_found")
    return row
