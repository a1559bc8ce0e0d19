"""GPU test fixtures: they skip, with the reason, unless torch, a CUDA device, the weights and the
evaluation photos are all present; they collect per-asset timings and peak GPU memory and write
them to $PHOTO3D_GPU_REPORT (JSON) when it is set."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


class GpuReport:
    """Rows of (backend, asset, seconds, peak memory, ...) for the run."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.environment: dict[str, Any] = {"python": platform.python_version()}

    def add(self, **row: Any) -> None:
        self.rows.append(row)
        print("GPU-REPORT " + json.dumps(row, sort_keys=True))


@pytest.fixture(scope="session")
def gpu_report() -> Iterator[GpuReport]:
    report = GpuReport()
    yield report
    target = os.environ.get("PHOTO3D_GPU_REPORT")
    if target and report.rows:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text(
            json.dumps({"environment": report.environment, "assets": report.rows}, indent=2)
        )


@pytest.fixture(scope="session")
def cuda_torch(gpu_report: GpuReport) -> Any:
    """torch with a working CUDA device, or a skip saying which is missing."""
    try:
        import torch
    except ImportError:
        pytest.skip("torch is not installed (GPU tests run in the GPU image)")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible to torch")
    props = torch.cuda.get_device_properties(0)
    gpu_report.environment.update(
        device=props.name,
        device_memory_bytes=int(props.total_memory),
        torch=torch.__version__,
        cuda=torch.version.cuda,
    )
    return torch


class BackendLoader:
    """Loads a backend once per test class and frees the GPU afterwards."""

    def __init__(self, torch: Any, report: GpuReport) -> None:
        self.torch = torch
        self.report = report

    def load(self, backend: Any) -> Any:
        return _load_backend(backend, self.torch, self.report)

    def unload(self, backend: Any) -> None:
        _unload_backend(backend, self.torch)


@pytest.fixture(scope="session")
def gpu_backends(cuda_torch: Any, gpu_report: GpuReport) -> BackendLoader:
    """Load/unload helper for the real GPU backends."""
    return BackendLoader(cuda_torch, gpu_report)


def _load_backend(backend: Any, torch: Any, gpu_report: GpuReport) -> Any:
    """Load a backend for the GPU tests; skip when weights or GPU libraries are absent here,
    fail when they are present and loading still breaks."""
    from serve_app.errors import BackendUnavailable

    try:
        backend.check_weights()
    except BackendUnavailable as exc:
        pytest.skip(f"{backend.label} weights not available: {exc.message}")
    torch.cuda.reset_peak_memory_stats()
    try:
        backend.load()
    except BackendUnavailable as exc:
        if exc.code == "gpu_stack_missing":
            pytest.skip(exc.message)
        raise
    gpu_report.add(
        backend=backend.name,
        asset="<load + warm-up>",
        seconds=backend.load_seconds,
        peak_gpu_memory_bytes=int(torch.cuda.max_memory_allocated()),
    )
    return backend


def _unload_backend(backend: Any, torch: Any) -> None:
    """Free the GPU for the next backend's tests."""
    import gc

    backend._pipeline = None
    gc.collect()
    torch.cuda.empty_cache()
