"""Service logic between the HTTP surface and the store: accept a generation (validate every
photo and option, store the photos, queue the task), read tasks back, cancel, delete."""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from PIL import Image
from pydantic import ValidationError

from serve_app import exports, preview
from serve_app.accounts import Accounts
from serve_app.artifacts import ArtifactStore, LocalArtifactStore
from serve_app.backends import available_backends
from serve_app.backends.base import GenerationOptions
from serve_app.batches import Batches
from serve_app.errors import Gone, InvalidInput, NotFound
from serve_app.images import ImageLimits, load_image, to_png
from serve_app.settings import Settings
from serve_app.store.batches import BatchStore
from serve_app.store.db import Database, Row
from serve_app.store.tasks import TaskQueue

if TYPE_CHECKING:
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


@dataclass
class Services:
    """What a process needs to serve requests: settings, database, queue, artifact store."""

    settings: Settings
    db: Database
    queue: TaskQueue
    store: ArtifactStore
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
        return cls(settings, db, queue, LocalArtifactStore(settings.artifacts_path), backends)

    @cached_property
    def accounts(self) -> Accounts:
        return Accounts(self.db)

    @cached_property
    def batches(self) -> Batches:
        return Batches(BatchStore(self.db))

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
        images: list[Image.Image] = [load_image(data, limits) for data in photos]
        digest = request_hash(photos, options.model_dump(mode="json"))
        if idempotency_key is not None:
            # A retry must not store its photos again: answer with the original task.
            task_by_key = self.queue.by_idempotency_key(account_id, idempotency_key)
            if task_by_key is not None:
                return check_same_request(task_by_key, digest, idempotency_key), False
        if batch_id is None:  # a bulk job bounds its own items in flight
            self.accounts.check_concurrency(account_id, self.settings.max_active_tasks)
        task_id = uuid.uuid4()
        keys = [f"inputs/{task_id}/photo-{i}.png" for i in range(len(images))]
        try:
            for key, image in zip(keys, images, strict=True):
                self.store.put(key, to_png(image))
            row, created = self.queue.submit(
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
            )
        except BaseException:
            self.store.delete_prefix(f"inputs/{task_id}")
            raise
        if not created:
            self.store.delete_prefix(f"inputs/{task_id}")
            return check_same_request(row, digest, idempotency_key or ""), False
        return self.queue.get(task_id, account_id) or row, True  # with its queue position

    # --- reading -------------------------------------------------------------------
    def get_task(self, account_id: str, task_id: str) -> Row:
        """The task, or NotFound when it does not exist or belongs to another account."""
        row = self.queue.get(parse_task_id(task_id), account_id)
        if row is None:
            raise NotFound(f"task {task_id} not found", code="task_not_found")
        return row

    def artifact(self, account_id: str, task_id: str, fmt: str) -> tuple[str, dict[str, Any]]:
        """(artifact key, file info) of one result format, converting on demand if needed."""
        row = self.get_task(account_id, task_id)
        result = row["result"]
        if row.get("expired_at") is not None:
            raise Gone(
                f"the result of task {task_id} expired and was deleted", code="result_expired"
            )
        if row["status"] != "succeeded" or not result:
            raise InvalidInput(
                f"task {task_id} has no result yet (status {row['status']})", code="task_not_ready"
            )
        if fmt == "preview":
            return result["preview"]["key"], {**result["preview"], "filename": "preview.png"}
        if fmt == "turntable":
            # Rendered on first request (a few CPU seconds), then kept beside the preview.
            key = result["preview"]["key"].rsplit("/", 1)[0] + "/turntable.webp"
            if not self.store.exists(key):
                glb = self.store.get(result["files"]["glb"]["key"])
                self.store.put(key, preview.render_turntable(glb))
            return key, {"key": key, "media_type": "image/webp", "filename": "turntable.webp"}
        files: dict[str, dict[str, Any]] = result["files"]
        if fmt in files:
            return files[fmt]["key"], files[fmt]
        if fmt not in exports.FORMATS:
            raise NotFound(
                f"format {fmt!r} is not available; choose one of "
                f"{', '.join(sorted(set(exports.FORMATS) | set(files)))}",
                code="unknown_format",
            )
        # A format not asked for at submit time is made from the GLB now and kept.
        info = exports.FORMATS[fmt]
        key = files["glb"]["key"].rsplit("/", 1)[0] + "/" + info.filename
        if not self.store.exists(key):
            self.store.put(key, exports.convert(self.store.get(files["glb"]["key"]), fmt))
        return key, {"key": key, "media_type": info.media_type, "filename": info.filename}

    def delete_task(self, account_id: str, task_id: str) -> None:
        """Remove a task, its timeline and every file it has."""
        tid = parse_task_id(task_id)
        row = self.queue.delete(tid, account_id)
        if row is None:
            raise NotFound(f"task {task_id} not found", code="task_not_found")
        self.store.delete_prefix(f"tasks/{tid}")
        self.store.delete_prefix(f"inputs/{tid}")


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
