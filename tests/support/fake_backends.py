"""FAKE backends for tests. They wrap the real CPU backend to make timing controllable; they are
never a reason to call a feature done on their own."""

from __future__ import annotations

import hashlib
import os
import time

from PIL import Image

from serve_app.backends.base import GeneratedAsset, GenerationOptions, ProgressCallback
from serve_app.backends.cpu import CPUBackend
from serve_app.errors import InvalidInput
from serve_app.settings import Settings


class SlowFakeBackend:
    """FAKE: sleeps PHOTO3D_FAKE_SLOW_SECONDS (reporting progress) before running the CPU backend,
    so a test can kill its replica mid-task."""

    name = "fake-slow"

    def __init__(self, settings: Settings) -> None:
        self.inner = CPUBackend(settings)
        self.seconds = float(os.environ.get("PHOTO3D_FAKE_SLOW_SECONDS", "6"))

    def load(self) -> None:
        self.inner.load()

    def check_health(self) -> None:
        self.inner.check_health()

    def generate(
        self, images: list[Image.Image], options: GenerationOptions, progress: ProgressCallback
    ) -> GeneratedAsset:
        steps = max(1, int(self.seconds / 0.25))
        for i in range(steps):
            progress(0.5 * i / steps, "fake-waiting")
            time.sleep(self.seconds / steps)
        return self.inner.generate(images, options, lambda f, s: progress(0.5 + f / 2, s))


class HangingFakeBackend:
    """FAKE: never returns, like a TRELLIS.2 mesh extraction that hangs."""

    name = "fake-hang"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def load(self) -> None:
        pass

    def check_health(self) -> None:
        pass

    def generate(
        self, images: list[Image.Image], options: GenerationOptions, progress: ProgressCallback
    ) -> GeneratedAsset:
        progress(0.1, "hanging")
        while True:
            time.sleep(1)


class HangOnceFakeBackend:
    """FAKE: hangs on the first attempt at a photo (until the watchdog kills the replica), then
    runs the CPU backend on the retry. It remembers photos in marker files under
    PHOTO3D_RUN_DIR, since the replica that hung is gone by the retry."""

    name = "fake-hang-once"

    def __init__(self, settings: Settings) -> None:
        self.inner = CPUBackend(settings)
        self.markers = settings.run_dir / "fake-hang-once"

    def load(self) -> None:
        self.markers.mkdir(parents=True, exist_ok=True)
        self.inner.load()

    def check_health(self) -> None:
        self.inner.check_health()

    def generate(
        self, images: list[Image.Image], options: GenerationOptions, progress: ProgressCallback
    ) -> GeneratedAsset:
        marker = self.markers / hashlib.sha256(images[0].tobytes()).hexdigest()
        if not marker.exists():
            marker.touch()
            progress(0.1, "hanging")
            while True:
                time.sleep(1)
        return self.inner.generate(images, options, progress)


class FailingFakeBackend:
    """FAKE: every generation fails with a permanent error (code `fake_unusable_photo`)."""

    name = "fake-fail"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def load(self) -> None:
        pass

    def check_health(self) -> None:
        pass

    def generate(
        self, images: list[Image.Image], options: GenerationOptions, progress: ProgressCallback
    ) -> GeneratedAsset:
        progress(0.2, "inspecting")
        raise InvalidInput("FAKE: this photo cannot be reconstructed", code="fake_unusable_photo")


class ZeroCostFakeBackend:
    """FAKE: returns the same small textured GLB at once, without looking at the photo, so a
    benchmark measures what the service adds around a generation (bench/overhead.py)."""

    name = "fake-zero"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.glb = b""

    def load(self) -> None:
        import numpy as np

        from tests.support.meshes import uv_sphere

        texture = np.full((64, 64, 3), (190, 60, 40), np.uint8)
        glb = uv_sphere(texture).export(file_type="glb")
        assert isinstance(glb, bytes)
        self.glb = glb

    def check_health(self) -> None:
        pass

    def generate(
        self, images: list[Image.Image], options: GenerationOptions, progress: ProgressCallback
    ) -> GeneratedAsset:
        progress(1.0, "done")
        return GeneratedAsset(glb=self.glb, stats={"faces": 0})
