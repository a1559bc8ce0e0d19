"""Torch helpers for the GPU backends: importing torch, CUDA checks, peak memory, out-of-memory
handling, stage timings and progress reporting. Torch is passed in, never imported at module
level, so this runs on machines without it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from serve_app.backends.base import ProgressCallback
from serve_app.errors import (
    BackendUnavailable,
    GenerationFailed,
)

log = logging.getLogger(__name__)


def import_torch() -> Any:
    """torch, or BackendUnavailable when this install has no GPU stack."""
    try:
        import torch
    except ImportError as exc:
        raise BackendUnavailable(
            "torch is not installed here; the TRELLIS backends run in the GPU image "
            "(cluster/docker/Dockerfile.gpu)",
            code="gpu_stack_missing",
        ) from exc
    return torch


def require_cuda(torch: Any, label: str) -> None:
    """BackendUnavailable unless a CUDA device is usable."""
    if not torch.cuda.is_available():
        raise BackendUnavailable(
            f"{label} needs an NVIDIA GPU with CUDA; torch sees none "
            f"(torch {getattr(torch, '__version__', '?')}, CUDA build {torch.version.cuda})",
            code="cuda_unavailable",
        )


def cuda_probe(torch: Any) -> None:
    """A tiny op on the device; raises BackendUnavailable when CUDA is broken (e.g. after an
    illegal memory access, which poisons the context for the rest of the process)."""
    try:
        x = torch.arange(8, device="cuda", dtype=torch.float32)
        value = float((x * 2).sum().item())
        torch.cuda.synchronize()
    except Exception as exc:  # any CUDA runtime error means this replica must go
        raise BackendUnavailable(
            f"CUDA is not usable: {type(exc).__name__}: {exc}", code="cuda_broken"
        ) from exc
    if value != 56.0:
        raise BackendUnavailable(
            f"CUDA returned a wrong result ({value} != 56.0)", code="cuda_broken"
        )


def reset_peak_memory(torch: Any | None) -> None:
    """Start a fresh peak-memory window for this task."""
    if torch is not None and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_bytes(torch: Any | None) -> int | None:
    """Peak bytes allocated on the device since the last reset."""
    if torch is not None and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return None


def release_memory(torch: Any | None) -> None:
    """Give cached blocks back after a task so the next one (or another process) can use them."""
    import gc

    gc.collect()
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_out_of_memory(torch: Any | None, exc: BaseException) -> bool:
    """True for torch.cuda.OutOfMemoryError (and its older RuntimeError spelling)."""
    oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None) if torch else None
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "CUDA out of memory" in str(exc)


def out_of_memory(label: str, hint: str) -> GenerationFailed:
    """The error a task gets when the GPU ran out of memory."""
    return GenerationFailed(f"{label} ran out of GPU memory; {hint}", code="gpu_out_of_memory")


class Stopwatch:
    """Named durations for task stats."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block under `name`."""
        start = self._clock()
        try:
            yield
        finally:
            self.seconds[name] = round(self._clock() - start, 3)


def report_progress(progress: ProgressCallback, fraction: float, stage: str) -> None:
    """Call the task's progress callback; a failing callback must not fail the generation."""
    try:
        progress(fraction, stage)
    except Exception:  # the callback belongs to the worker; its bugs are logged, not raised
        log.exception("progress callback failed at %s", stage)
