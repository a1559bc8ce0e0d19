"""Bulk conversion: every photo in a folder (or listed in a manifest) becomes a task of one batch.

Run it as a Ray Job on the cluster that serves photo3d, so it reaches the same PostgreSQL and
artifact store (settings come from the same PHOTO3D_* / DATABASE_URL environment):

    ray job submit --working-dir . -- python jobs/bulk_convert.py --input /data/photos \\
        --output /data/models --formats glb,stl

or locally beside `make run`: `.venv/bin/python jobs/bulk_convert.py --input photos/`.

The job validates and queues every photo (same checks as the API; a bad file is reported, not
fatal), then follows the batch until each task has ended, copies the results to --output and
writes report.json and report.html there (with previews). The generator deployments do the work,
so a batch scales the GPUs exactly as API traffic does, and a job that dies can be rerun with the
same --batch-id: photos already queued in the batch are not queued twice.
"""

from __future__ import annotations

import argparse
import html
import json
import sys
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from serve_app.errors import Photo3DError
from serve_app.results import TaskResult
from serve_app.service import Services
from serve_app.settings import get_settings
from serve_app.store.tasks import TERMINAL

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


def find_photos(source: Path) -> list[Path]:
    """Photos in a folder (recursively, sorted), or the paths listed in a manifest (one a line,
    relative to the manifest; '#' comments allowed)."""
    if source.is_dir():
        return sorted(p for p in source.rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES)
    lines = [line.strip() for line in source.read_text().splitlines()]
    return [(source.parent / line) for line in lines if line and not line.startswith("#")]


def submit_all(
    services: Services,
    photos: Iterable[Path],
    *,
    account: str,
    batch_id: str,
    options: dict[str, Any],
    parallel: int,
) -> list[dict[str, Any]]:
    """Queue each photo as a task of the batch; the idempotency key makes a rerun safe."""

    def one(path: Path) -> dict[str, Any]:
        entry: dict[str, Any] = {"photo": str(path)}
        try:
            row, _ = services.submit(
                account,
                [path.read_bytes()],
                options,
                batch_id=batch_id,
                idempotency_key=f"{batch_id}:{path}",
            )
            entry["task_id"] = str(row["id"])
        except Photo3DError as exc:
            entry["error"] = {"code": exc.code, "message": exc.message}
        except OSError as exc:
            entry["error"] = {"code": "unreadable_file", "message": str(exc)}
        return entry

    with ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(one, photos))


def wait_for_batch(
    services: Services,
    entries: list[dict[str, Any]],
    *,
    account: str,
    timeout: float,
    poll: float = 2.0,
) -> None:
    """Follow every queued task until it ends (or the timeout passes), printing progress."""
    pending = {e["task_id"]: e for e in entries if "task_id" in e}
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for task_id, entry in list(pending.items()):
            row = services.get_task(account, task_id)
            if row["status"] in TERMINAL:
                entry["row"] = row
                del pending[task_id]
        done = len([e for e in entries if "row" in e])
        print(f"batch: {done}/{len(entries)} ended, {len(pending)} to go", flush=True)
        if pending:
            time.sleep(poll)
    for task_id, entry in pending.items():
        entry["row"] = services.get_task(account, task_id)


def collect(services: Services, entries: list[dict[str, Any]], output: Path) -> dict[str, Any]:
    """Copy results to `output` and build the report."""
    output.mkdir(parents=True, exist_ok=True)
    items = []
    for entry in entries:
        item: dict[str, Any] = {"photo": entry["photo"], "task_id": entry.get("task_id")}
        row = entry.get("row")
        if "error" in entry:
            item.update(status="rejected", error=entry["error"])
        elif row is not None:
            item["status"] = row["status"]
            if row.get("error_code"):
                item["error"] = {"code": row["error_code"], "message": row["error_message"]}
            result = TaskResult.of_row(row)
            if result is not None:
                stem = Path(entry["photo"]).stem
                files = {}
                for fmt, info in result.files.items():
                    # model.glb -> <stem>.glb, model_obj.zip -> <stem>_obj.zip
                    target = output / f"{stem}{info.filename.removeprefix('model')}"
                    target.write_bytes(services.artifacts.get(info.key))
                    files[fmt] = target.name
                preview = output / f"{stem}.preview.png"
                preview.write_bytes(services.artifacts.get(result.preview.key))
                item.update(files=files, preview=preview.name, seconds=result.timings.total_s)
        items.append(item)
    counts: dict[str, int] = {}
    for item in items:
        counts[item["status"]] = counts.get(item["status"], 0) + 1
    return {"items": items, "counts": counts}


def write_report(report: dict[str, Any], output: Path, batch_id: str) -> None:
    (output / "report.json").write_text(json.dumps({"batch_id": batch_id, **report}, indent=2))
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
        error = html.escape(item.get("error", {}).get("message", ""))
        rows.append(
            f"<tr><td>{preview}</td><td>{html.escape(item['photo'])}</td>"
            f"<td>{html.escape(item['status'])}</td><td>{links}</td><td>{error}</td></tr>"
        )
    counts = ", ".join(f"{n} {status}" for status, n in sorted(report["counts"].items()))
    (output / "report.html").write_text(
        f"<!doctype html><meta charset=utf-8><title>photo3d batch {html.escape(batch_id)}</title>"
        f"<h1>Batch {html.escape(batch_id)}</h1><p>{html.escape(counts)}</p>"
        "<table><tr><th>preview</th><th>photo</th><th>status</th><th>files</th><th>error</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, type=Path, help="folder of photos or manifest")
    parser.add_argument("--output", required=True, type=Path, help="where results and report go")
    parser.add_argument("--backend", help="backend (default: the server default)")
    parser.add_argument("--formats", default="glb", help="comma separated, e.g. glb,stl,usdz")
    parser.add_argument("--account", default="local", help="account that owns the tasks")
    parser.add_argument("--batch-id", help="name of the batch (rerun with it to resume)")
    parser.add_argument("--parallel", type=int, default=4, help="photos validated at once")
    parser.add_argument("--timeout", type=float, default=24 * 3600, help="seconds to wait")
    args = parser.parse_args(argv)

    photos = find_photos(args.input)
    if not photos:
        print(f"no photos found in {args.input}", file=sys.stderr)
        return 2
    batch_id = args.batch_id or f"batch-{uuid.uuid4().hex[:12]}"
    options: dict[str, Any] = {"formats": [f.strip() for f in args.formats.split(",") if f.strip()]}
    if args.backend:
        options["backend"] = args.backend
    services = Services.from_settings(get_settings())
    services.db.open(wait=True)
    try:
        entries = submit_all(
            services,
            photos,
            account=args.account,
            batch_id=batch_id,
            options=options,
            parallel=args.parallel,
        )
        queued = sum("task_id" in e for e in entries)
        print(f"batch {batch_id}: {queued} queued, {len(entries) - queued} rejected", flush=True)
        wait_for_batch(services, entries, account=args.account, timeout=args.timeout)
        report = collect(services, entries, args.output)
    finally:
        services.close()
    write_report(report, args.output, batch_id)
    print(f"batch {batch_id}: {report['counts']}; report in {args.output / 'report.html'}")
    return 0 if report["counts"].get("succeeded", 0) == queued else 1


if __name__ == "__main__":
    sys.exit(main())
