"""Bulk conversion: every photo of a folder or manifest becomes a task of one batch.

Submit it as a Ray Job to the cluster that serves photo3d, so that it reaches the same PostgreSQL
and artifact store (settings come from the cluster's PHOTO3D_* / DATABASE_URL environment):

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m jobs.bulk_convert --input /data/photos --output /data/models --formats glb,stl

(`make run` serves Ray's job server on 127.0.0.1:8265; on a VM cluster or KubeRay use its
address, or the RayJob in k8s/). It also runs as a plain script beside `make run` (without
DATABASE_URL, on the embedded PostgreSQL in its run folder).

Sources: a folder (recursive), or a manifest: CSV with a `photo` column (path relative to the
manifest, or an http(s) URL) and optional `id` and option columns (`backend`, `texture_size`,
`formats` as "glb;stl", …), or JSON Lines with {"photo": …, "id": …, "options": {…}}.

Photos are read one at a time and at most PHOTO3D_MAX_BATCH_IN_FLIGHT (or --in-flight) of the
job's tasks are queued or running at once; batch tasks run at a lower priority than interactive
ones and do not count against the account's interactive limit. Rerunning the same command
resumes the same batch: an item whose photo and options were already converted for the account
is not converted again (the idempotency key is the content hash plus the options). The job ends
with report.json and report.html (with previews) in --output, and exits non-zero only when the
job itself failed (no photos, database unreachable, …), never because some items failed.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import hashlib
import html
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve_app.batches import BATCH_PRIORITY
from serve_app.embedded_pg import database_url_or_embedded
from serve_app.errors import Photo3DError
from serve_app.results import TaskResult
from serve_app.service import Services
from serve_app.settings import Settings, get_settings
from serve_app.store.tasks import TERMINAL

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".heic", ".heif", ".avif"}
MANIFEST_SUFFIXES = {".csv", ".jsonl", ".ndjson"}


@dataclass
class Item:
    """One photo of the source, with its per-row options and a name for its outputs."""

    photo: str  # a path, or an http(s) URL from a manifest
    name: str
    options: dict[str, Any] = field(default_factory=dict)


def _name_for(relative: Path) -> str:
    """An output name from a photo's path below the source: a/b/x.jpg -> a__b__x."""
    return "__".join(relative.with_suffix("").parts)


def _csv_options(row: dict[str, str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for key, value in row.items():
        if key in ("photo", "id") or value is None or value == "":
            continue
        if key == "formats":
            options[key] = [f.strip() for f in value.replace(";", ",").split(",") if f.strip()]
            continue
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        options[key] = parsed if isinstance(parsed, int | float | bool) else value
    return options


def _s3_client() -> Any:
    """An S3 client from the standard AWS variables (AWS_ENDPOINT_URL, keys, region), as the
    S3 artifact store makes it."""
    from serve_app.artifacts import _s3_client as s3_client

    return s3_client(os.environ.get("AWS_ENDPOINT_URL") or None)


def _split_s3(url: str) -> tuple[str, str]:
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    if not bucket:
        raise SystemExit(f"{url}: name a bucket, e.g. s3://photos/catalogue/")
    return bucket, prefix


def iter_s3_items(url: str) -> Iterator[Item]:
    """The photos under an S3 prefix (recursively, in key order), listed a page at a time."""
    bucket, prefix = _split_s3(url)
    pages = _s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    for page in pages:
        for entry in page.get("Contents", []):
            key = entry["Key"]
            if Path(key).suffix.lower() in PHOTO_SUFFIXES:
                relative = Path(key.removeprefix(prefix).lstrip("/"))
                yield Item(f"s3://{bucket}/{key}", _name_for(relative))


def iter_items(source: Path | str) -> Iterator[Item]:
    """The items of a folder (recursively, in path order), an S3 prefix (`s3://bucket/prefix`)
    or a CSV / JSON Lines manifest, yielded one at a time (a catalogue's paths are read lazily,
    its photos never all at once)."""
    if isinstance(source, str) and source.startswith("s3://"):
        yield from iter_s3_items(source)
        return
    source = Path(source)
    if source.is_dir():
        for path in sorted(source.rglob("*")):
            if path.is_file() and path.suffix.lower() in PHOTO_SUFFIXES:
                yield Item(str(path), _name_for(path.relative_to(source)))
        return
    suffix = source.suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise SystemExit(f"{source}: not a folder or a manifest ({', '.join(MANIFEST_SUFFIXES)})")
    with source.open(newline="") as handle:
        if suffix == ".csv":
            rows: Iterator[dict[str, Any]] = (
                {"photo": r.get("photo"), "id": r.get("id"), "options": _csv_options(r)}
                for r in csv.DictReader(handle)
            )
        else:
            rows = (json.loads(line) for line in handle if line.strip())
        for number, row in enumerate(rows, start=1):
            photo = str(row.get("photo") or "")
            if not photo.startswith(("http://", "https://")) and photo:
                photo = str(source.parent / photo)
            name = str(row.get("id") or _name_for(Path(photo.rsplit("/", 1)[-1] or str(number))))
            yield Item(photo, name, dict(row.get("options") or {}))


def item_key(photo: bytes, options: dict[str, Any]) -> str:
    """The item's idempotency key: the photo's content and the options, nothing else, so a
    rerun (or the same photo in another batch) finds the task it made before."""
    digest = hashlib.sha256(photo)
    digest.update(json.dumps(options, sort_keys=True).encode())
    return f"bulk:{digest.hexdigest()[:48]}"


def read_photo(item: Item, settings: Settings) -> bytes:
    if item.photo.startswith(("http://", "https://")):
        from serve_app.fetch import fetch_image_url

        fetching = fetch_image_url(
            item.photo,
            max_bytes=settings.max_upload_bytes,
            timeout=settings.url_fetch_timeout_seconds,
            max_redirects=settings.url_max_redirects,
            allow_hosts=settings.url_allow_host_set,
        )
        return asyncio.run(fetching)
    if not item.photo:
        raise OSError("the manifest row names no photo")
    if item.photo.startswith("s3://"):
        bucket, key = _split_s3(item.photo)
        body = _s3_client().get_object(Bucket=bucket, Key=key)["Body"]
        data: bytes = body.read(settings.max_upload_bytes + 1)  # never more than the limit
        body.close()
        return data  # one byte over the limit: the service refuses it with a clear code
    return Path(item.photo).read_bytes()


class Progress:
    """A progress bar on a terminal; plain progress lines in a Ray Job's log."""

    def __init__(self, batch_id: str, every: float = 5.0) -> None:
        self.batch_id = batch_id
        self.tty = sys.stdout.isatty()
        self.every = every
        self.last = 0.0
        self.started = time.monotonic()

    def show(self, done: int, total: int | None, counts: dict[str, int], force: bool = False):
        now = time.monotonic()
        if not force and not self.tty and now - self.last < self.every:
            return
        self.last = now
        minutes = max(now - self.started, 1e-6) / 60
        rate = done / minutes
        of = f"/{total}" if total is not None else ""
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()) if n)
        eta = ""
        if total is not None and rate > 0 and done < total:
            eta = f", ETA {(total - done) / rate * 60:.0f} s"
        text = f"{done}{of} items ended ({summary}); {rate:.1f} photos/min{eta}"
        if self.tty and total:
            filled = int(30 * done / total)
            print(f"\r[{'#' * filled}{'.' * (30 - filled)}] {text}", end="", flush=True)
            if force:
                print()
        else:
            print(f"batch {self.batch_id}: {text}", flush=True)


class BulkJob:
    """Feeds a source's items into the queue, at most `in_flight` at a time, and collects each
    result as it ends."""

    def __init__(
        self,
        services: Services,
        *,
        account: str,
        batch_id: str,
        options: dict[str, Any],
        output: Path,
        in_flight: int,
        poll: float = 1.0,
    ) -> None:
        self.services = services
        self.account = account
        self.batch_id = batch_id
        self.options = options
        self.output = output
        self.in_flight = in_flight
        self.poll = poll
        self.items: list[dict[str, Any]] = []
        self.pending: dict[uuid.UUID, dict[str, Any]] = {}
        self.rejected: dict[str, int] = {}
        self.counts: dict[str, int] = {}
        self.progress = Progress(batch_id)

    def run(self, items: Iterator[Item], source: str) -> dict[str, Any]:
        batches = self.services.batches
        batches.start(self.account, self.batch_id, source, self.options)
        self.output.mkdir(parents=True, exist_ok=True)
        total = 0
        for item in items:
            total += 1
            while len(self.pending) >= self.in_flight:
                self._collect_ended()
                if len(self.pending) >= self.in_flight:
                    time.sleep(self.poll)
            self._submit(item)
            if total % 50 == 0:
                batches.update(self.account, self.batch_id, rejected=self.rejected)
        batches.update(self.account, self.batch_id, total=total, rejected=self.rejected)
        while self.pending:
            self._collect_ended()
            if self.pending:
                time.sleep(self.poll)
        self.progress.show(len(self.items), total, self.counts, force=True)
        batches.update(self.account, self.batch_id, status="completed")
        return {"batch_id": self.batch_id, "counts": self.counts, "items": self.items}

    def _count(self, status: str) -> None:
        self.counts[status] = self.counts.get(status, 0) + 1

    def _submit(self, item: Item) -> None:
        entry: dict[str, Any] = {"photo": item.photo, "name": item.name}
        options = {**self.options, **item.options}
        try:
            photo = read_photo(item, self.services.settings)
            row, created = self.services.submit(
                self.account,
                [photo],
                options,
                idempotency_key=item_key(photo, options),
                batch_id=self.batch_id,
                priority=BATCH_PRIORITY,
            )
        except Photo3DError as exc:
            self._reject(entry, exc.code, exc.message)
            return
        except OSError as exc:
            self._reject(entry, "unreadable_file", str(exc))
            return
        entry["task_id"] = str(row["id"])
        if not created and row["status"] == "succeeded":
            entry["skipped"] = True  # converted before (an earlier run, or another batch)
        self.pending[row["id"]] = entry

    def _reject(self, entry: dict[str, Any], code: str, message: str) -> None:
        self.rejected[code] = self.rejected.get(code, 0) + 1
        self._count("rejected")
        self.items.append(
            {**entry, "status": "rejected", "error": {"code": code, "message": message}}
        )
        print(f"rejected {entry['photo']}: {code}: {message}", flush=True)

    def _collect_ended(self) -> None:
        rows = self.services.batches.store.task_states(self.account, list(self.pending))
        known = {row["id"] for row in rows}
        for task_id in [t for t in self.pending if t not in known]:  # deleted meanwhile
            entry = self.pending.pop(task_id)
            self._finish(entry, {"status": "canceled", "error_code": "task_deleted"})
        for row in rows:
            if row["status"] in TERMINAL:
                self._finish(self.pending.pop(row["id"]), row)
        self.progress.show(len(self.items), None, self.counts)

    def _finish(self, entry: dict[str, Any], row: dict[str, Any]) -> None:
        status = "skipped" if entry.pop("skipped", False) else row["status"]
        item: dict[str, Any] = {**entry, "status": status}
        if row.get("error_code"):
            item["error"] = {"code": row["error_code"], "message": row.get("error_message") or ""}
        result = TaskResult.of_row(row) if row.get("expired_at") is None else None
        if result is not None:
            item.update(self._copy_outputs(entry["name"], entry["task_id"], result))
        self._count(status)
        self.items.append(item)

    def _copy_outputs(self, name: str, task_id: str, result: TaskResult) -> dict[str, Any]:
        """Copy each format and the preview to the output folder: <name>.glb, <name>_obj.zip,
        <name>.mask.png…"""
        artifacts = self.services.artifacts
        files = {}
        for fmt in result.files:
            # A format the worker has not converted yet (it does so after the task succeeds)
            # is converted now by the service, as a download would.
            info = self.services.artifact(self.account, task_id, fmt)
            # model.glb → <name>.glb, model_obj.zip → <name>_obj.zip; other files (mask.png)
            # keep their whole name after a dot.
            rest = info.filename.removeprefix("model")
            target = self.output / f"{name}{rest if rest != info.filename else '.' + rest}"
            target.write_bytes(artifacts.get(info.key))
            files[fmt] = target.name
        preview = self.output / f"{name}.preview.png"
        # The worker renders the preview just after the task succeeds; the service renders it
        # now if this comes first.
        shown = self.services.artifact(self.account, task_id, "preview")
        preview.write_bytes(artifacts.get(shown.key))
        return {"files": files, "preview": preview.name, "seconds": result.timings.total_s}


def write_report(report: dict[str, Any], output: Path) -> None:
    """report.json, and report.html with a preview, the files and the error of every item."""
    batch_id = report["batch_id"]
    (output / "report.json").write_text(json.dumps(report, indent=2, default=str))
    rows = []
    for item in report["items"]:
        preview = (
            f'<img src="{html.escape(item["preview"])}" width="160" alt="">'
            if item.get("preview")
            else ""
        )
        links = " ".join(
            f'<a href="{html.escape(name)}">{html.escape(fmt)}</a>'
            for fmt, name in item.get("files", {}).items()
        )
        error = item.get("error") or {}
        seconds = item.get("seconds")
        rows.append(
            f"<tr><td>{preview}</td><td>{html.escape(item['photo'])}</td>"
            f"<td>{html.escape(item['status'])}</td>"
            f"<td>{'' if seconds is None else f'{seconds:.1f}'}</td><td>{links}</td>"
            f"<td>{html.escape(error.get('code', ''))} {html.escape(error.get('message', ''))}"
            "</td></tr>"
        )
    counts = ", ".join(f"{n} {status}" for status, n in sorted(report["counts"].items()))
    (output / "report.html").write_text(
        f"<!doctype html><meta charset=utf-8><title>photo3d batch {html.escape(batch_id)}</title>"
        f"<h1>Batch {html.escape(batch_id)}</h1><p>{html.escape(counts)}</p>"
        "<table><tr><th>preview</th><th>photo</th><th>status</th><th>seconds</th><th>files</th>"
        "<th>error</th></tr>" + "".join(rows) + "</table>"
    )


def default_batch_id(account: str, source: str, options: dict[str, Any]) -> str:
    """The same command names the same batch, so rerunning it resumes that batch."""
    where = source if source.startswith("s3://") else str(Path(source).resolve())
    key = json.dumps([account, where, options], sort_keys=True)
    return f"bulk-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--input", required=True, help="folder of photos, CSV/JSONL manifest, or s3://bucket/prefix"
    )
    parser.add_argument("--output", required=True, type=Path, help="where results and report go")
    parser.add_argument("--backend", help="backend (default: the server default)")
    parser.add_argument("--formats", default="glb", help="comma separated, e.g. glb,stl,usdz")
    parser.add_argument("--account", default="local", help="account that owns the tasks")
    parser.add_argument("--batch-id", help="name of the batch (default: derived from the command)")
    parser.add_argument(
        "--in-flight",
        type=int,
        help="tasks queued or running at once (PHOTO3D_MAX_BATCH_IN_FLIGHT)",
    )
    args = parser.parse_args(argv)

    if not args.input.startswith("s3://") and not Path(args.input).exists():
        print(f"{args.input} does not exist", file=sys.stderr)
        return 2
    options: dict[str, Any] = {"formats": [f.strip() for f in args.formats.split(",") if f.strip()]}
    if args.backend:
        options["backend"] = args.backend
    batch_id = args.batch_id or default_batch_id(args.account, args.input, options)
    # Beside `make run` without DATABASE_URL: the embedded server in its run folder.
    _url, _embedded = database_url_or_embedded(get_settings())
    settings = get_settings()
    services = Services.from_settings(settings)
    services.db.open(wait=True)
    backend = options.get("backend") or settings.default_backend
    if not services.queue.live_workers(settings.worker_alive_seconds).get(backend):
        print(
            f"note: no live worker for backend {backend!r} yet: its tasks wait until one starts "
            "(is photo3d running against this database?)",
            file=sys.stderr,
            flush=True,
        )
    job = BulkJob(
        services,
        account=args.account,
        batch_id=batch_id,
        options=options,
        output=args.output,
        in_flight=args.in_flight or settings.max_batch_in_flight,
    )
    print(f"batch {batch_id}: converting {args.input} into {args.output}", flush=True)
    try:
        report = job.run(iter_items(args.input), args.input)
    except BaseException:
        services.batches.update(args.account, batch_id, status="failed")
        raise
    finally:
        services.close()
    write_report(report, args.output)
    counts = report["counts"]
    if not report["items"]:
        print(f"no photos found in {args.input}", file=sys.stderr)
        return 2
    print(f"batch {batch_id}: {counts}; report in {args.output / 'report.html'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
