"""Where a task's files live in the artifact store: the one place that spells the key layout.

inputs/<task>/photo-<i>.png                 the photos as submitted (normalised to PNG)
tasks/<task>/attempt-<n>/<filename>         what attempt n produced: model.glb, exports,
                                            preview.png, and files made later on demand
                                            (another format, turntable.webp) beside them
"""

from __future__ import annotations

import uuid

TaskId = uuid.UUID | str


def inputs_prefix(task_id: TaskId) -> str:
    """Every input photo of a task."""
    return f"inputs/{task_id}"


def input_key(task_id: TaskId, index: int, suffix: str = ".png") -> str:
    """The index-th input photo of a task, stored as it came (`suffix` from its format)."""
    return f"{inputs_prefix(task_id)}/photo-{index}{suffix}"


def task_prefix(task_id: TaskId) -> str:
    """Every file any attempt of a task produced."""
    return f"tasks/{task_id}"


def attempt_prefix(task_id: TaskId, attempt: int) -> str:
    """The files of one attempt (a lost or failed attempt's files go as one prefix)."""
    return f"{task_prefix(task_id)}/attempt-{attempt}"


def attempt_file(task_id: TaskId, attempt: int, filename: str) -> str:
    """One file an attempt produced."""
    return f"{attempt_prefix(task_id, attempt)}/{filename}"


def beside(key: str, filename: str) -> str:
    """A file kept next to an existing one (a format converted later, the turntable)."""
    return f"{key.rsplit('/', 1)[0]}/{filename}"


def task_prefixes(task_id: TaskId) -> tuple[str, str]:
    """Everything stored for a task: its outputs and its inputs (what delete and expiry remove)."""
    return task_prefix(task_id), inputs_prefix(task_id)
