"""The backend skeleton shared by TRELLIS and TRELLIS.2: load / generate / health."""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image

from serve_app.backends.base import GeneratedAsset, GenerationOptions, ProgressCallback
from serve_app.backends.gpu.paths import configure_offline, local_paths
from serve_app.backends.gpu.torch_helpers import (
    Stopwatch,
    cuda_probe,
    import_torch,
    is_out_of_memory,
    out_of_memory,
    peak_memory_bytes,
    release_memory,
    report_progress,
    require_cuda,
    reset_peak_memory,
)
from serve_app.errors import (
    BackendUnavailable,
    Photo3DError,
)
from serve_app.settings import Settings

log = logging.getLogger(__name__)


class GpuBackend:
    """Load / generate / health flow shared by the TRELLIS backends.

    Subclasses supply the model-specific parts: `check_weights`, `_load_pipeline`, `_warm_up`,
    `_validate` and `_generate`. A pipeline passed to the constructor (a test fake) makes `load`
    skip weights, CUDA and imports, so the same generate code runs on a CPU-only machine."""

    name = "gpu"
    label = "GPU backend"
    oom_hint = "try a smaller input or a GPU with more memory"

    def __init__(
        self,
        settings: Settings,
        *,
        pipeline: Any | None = None,
        torch: Any | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.settings = settings
        self.paths = local_paths(settings)
        self._pipeline = pipeline
        self._torch = torch
        self._clock = clock or time.perf_counter
        self.load_seconds: float | None = None

    # -- to implement ----------------------------------------------------------------------
    def check_weights(self) -> Any:
        """Raise BackendUnavailable naming every missing file; return what loading needs."""
        raise NotImplementedError

    def _load_pipeline(self, torch: Any, plan: Any) -> Any:
        raise NotImplementedError

    def _warm_up(self, pipeline: Any) -> None:
        raise NotImplementedError

    def _validate(self, images: Sequence[Image.Image], options: GenerationOptions) -> None:
        raise NotImplementedError

    def _generate(
        self,
        pipeline: Any,
        images: Sequence[Image.Image],
        options: GenerationOptions,
        progress: ProgressCallback,
        watch: Stopwatch,
    ) -> GeneratedAsset:
        raise NotImplementedError

    # -- Backend protocol ------------------------------------------------------------------------
    def load(self) -> None:
        """Check weights, go offline, load the pipeline onto the GPU and warm it up."""
        if self._pipeline is not None:
            return
        start = self._clock()
        plan = self.check_weights()
        configure_offline(self.paths)
        torch = import_torch()
        require_cuda(torch, self.label)
        try:
            pipeline = self._load_pipeline(torch, plan)
        except Photo3DError:
            raise
        except ImportError as exc:
            raise BackendUnavailable(
                f"{self.label}: a GPU library is missing ({exc}); use the GPU image "
                "(cluster/docker/Dockerfile.gpu)",
                code="gpu_stack_missing",
            ) from exc
        except Exception as exc:  # a replica that cannot load must say why and stay out of service
            raise BackendUnavailable(
                f"{self.label} failed to load: {type(exc).__name__}: {exc}", code="load_failed"
            ) from exc
        self._torch = torch
        if self.settings.gpu_warmup:
            try:
                self._warm_up(pipeline)
            except Exception as exc:  # warm-up touches every CUDA extension: failing is fatal
                raise BackendUnavailable(
                    f"{self.label} warm-up failed: {type(exc).__name__}: {exc}",
                    code="warmup_failed",
                ) from exc
            finally:
                release_memory(torch)
        self._pipeline = pipeline
        self.load_seconds = round(self._clock() - start, 3)
        log.info("%s loaded in %.1f s", self.label, self.load_seconds)

    def generate(
        self, images: list[Image.Image], options: GenerationOptions, progress: ProgressCallback
    ) -> GeneratedAsset:
        """Validate, run the pipeline, export; GPU memory is released whatever happens."""
        pipeline = self._require_loaded()
        self._validate(images, options)
        torch = self._torch
        watch = Stopwatch(self._clock)
        reset_peak_memory(torch)
        try:
            asset = self._generate(pipeline, images, options, progress, watch)
        except Photo3DError:
            raise
        except Exception as exc:
            if is_out_of_memory(torch, exc):
                # The traceback's frames hold the task's GPU tensors; drop them so the
                # empty_cache below really frees the memory for the next task.
                traceback.clear_frames(exc.__traceback__)
                raise out_of_memory(self.label, self.oom_hint) from exc
            raise
        finally:
            release_memory(torch)
        for stage, seconds in watch.seconds.items():
            asset.stats[f"seconds_{stage}"] = seconds
        peak = peak_memory_bytes(torch)
        if peak is not None:
            asset.stats["peak_gpu_memory_bytes"] = peak
        report_progress(progress, 1.0, "done")
        return asset

    def check_health(self) -> None:
        """Raise when the pipeline is not loaded or CUDA no longer works."""
        self._require_loaded()
        if self._torch is not None:
            cuda_probe(self._torch)

    def _require_loaded(self) -> Any:
        if self._pipeline is None:
            raise BackendUnavailable(
                f"{self.label} is not loaded (call load() first)", code="backend_not_loaded"
            )
        return self._pipeline
