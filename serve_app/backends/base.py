"""The backend interface: `load()`, `generate(images, options, progress) -> GeneratedAsset`,
`check_health()`. Every backend (CPU baseline, TRELLIS, TRELLIS.2) implements it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from serve_app.formats import FORMAT_NAMES, OutputFormat


class GenerationOptions(BaseModel):
    """Options a client may set on a generation. Unknown keys are refused (4xx)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: str | None = Field(default=None, description="Backend name; server default if unset.")
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    steps: int | None = Field(default=None, ge=1, le=100, description="Sampler steps (TRELLIS).")
    guidance: float | None = Field(
        default=None, ge=0.0, le=20.0, description="Classifier-free guidance strength (TRELLIS)."
    )
    resolution: Literal[512, 1024, 1536] | None = Field(
        default=None, description="TRELLIS.2 pipeline resolution."
    )
    texture_size: Literal[512, 1024, 2048, 4096] = 1024
    face_limit: int = Field(default=20000, ge=500, le=500_000)
    simplify: float = Field(
        default=0.95, ge=0.0, le=0.99, description="Fraction of faces removed (TRELLIS to_glb)."
    )
    # GLB is always produced; the other formats are converted from it.
    formats: list[OutputFormat] = Field(
        default_factory=lambda: ["glb"], min_length=1, max_length=len(FORMAT_NAMES)
    )
    remove_background: bool | None = Field(
        default=None, description="Segment the object; unset means auto (alpha channel if present)."
    )
    multi_image_mode: Literal["stochastic", "multidiffusion"] = "stochastic"


ProgressCallback = Callable[[float, str], None]
"""progress(fraction 0..1, stage name); backends call it as they go."""


@dataclass
class GeneratedAsset:
    """What a backend returns: a GLB (always) plus optional extra files and a preview."""

    glb: bytes
    extra_files: dict[str, bytes] = field(default_factory=dict)  # e.g. {"gaussians.ply": ...}
    preview_png: bytes | None = None
    # The object mask the backend used (white = object), when it segments: shown to the user
    # so they can see why a model looks wrong.
    mask_png: bytes | None = None
    stats: dict[str, float | int | str] = field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    """A generator of 3D assets from one or more photos of the same object."""

    name: str

    def load(self) -> None:
        """Load weights / warm up. Raises BackendUnavailable with a clear reason."""

    def generate(
        self, images: list[Image.Image], options: GenerationOptions, progress: ProgressCallback
    ) -> GeneratedAsset:
        """Turn photos into an asset. Raises InvalidInput/GenerationFailed for this input."""

    def check_health(self) -> None:
        """Raise when the backend can no longer serve (CUDA lost, model broken)."""
