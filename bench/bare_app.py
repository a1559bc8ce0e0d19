"""The bare comparison app of bench/api.py: the least a photo-to-3D ingress must do per request
(parse the multipart upload, check the image header with Pillow, write the file, INSERT the task
row into the same PostgreSQL, answer 202 JSON; read the row back on GET). Not part of photo3d."""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, File, HTTPException, UploadFile
from PIL import Image
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool
from starlette.concurrency import run_in_threadpool

FOLDER = Path(os.environ.get("BARE_DIR", "/tmp/photo3d-bare"))
FOLDER.mkdir(parents=True, exist_ok=True)
pool = ConnectionPool(
    os.environ["DATABASE_URL"], min_size=2, max_size=8, kwargs={"row_factory": dict_row}
)
app = FastAPI()


@app.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


def _store(data: bytes) -> dict[str, str]:
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size  # the header only, as a validating ingress would read
    if width < 16 or height < 16:
        raise HTTPException(400, "too small")
    task_id = uuid.uuid4()
    (FOLDER / f"{task_id}.jpg").write_bytes(data)
    with pool.connection() as conn:
        conn.execute(
            "INSERT INTO tasks (id, account_id, backend, options, inputs, max_attempts)"
            " VALUES (%s, 'local', 'bare', %s, %s, 3)",
            (task_id, Jsonb({}), Jsonb([f"{task_id}.jpg"])),
        )
    return {"id": str(task_id), "status": "queued"}


@app.post("/generate", status_code=202)
async def generate(image: Annotated[UploadFile, File()]) -> dict[str, str]:
    data = await image.read()
    return await run_in_threadpool(_store, data)


@app.get("/task/{task_id}")
def get_task(task_id: uuid.UUID) -> dict:
    with pool.connection() as conn:
        row = conn.execute(
            "SELECT id, status, backend, progress, created_at FROM tasks WHERE id = %s",
            (task_id,),
        ).fetchone()
    if row is None:
        raise HTTPException(404, "not found")
    return {**row, "id": str(row["id"])}
