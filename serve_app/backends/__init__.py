"""Backend registry: backends are chosen by name and imported lazily (GPU libraries stay
out of processes that never use them)."""

from __future__ import annotations

import importlib

from serve_app.backends.base import Backend, GeneratedAsset, GenerationOptions
from serve_app.errors import InvalidInput
from serve_app.settings import Settings, get_settings

BUILTIN_BACKENDS: dict[str, str] = {
    "cpu": "serve_app.backends.cpu:CPUBackend",
    "trellis": "serve_app.backends.trellis:TrellisBackend",
    "trellis2": "serve_app.backends.trellis2:Trellis2Backend",
}

__all__ = ["Backend", "GeneratedAsset", "GenerationOptions", "available_backends", "create_backend"]


def available_backends(settings: Settings | None = None) -> dict[str, str]:
    """Name -> import path of every backend this installation knows."""
    settings = settings or get_settings()
    return {**BUILTIN_BACKENDS, **settings.extra_backend_map}


def create_backend(name: str, settings: Settings | None = None) -> Backend:
    """Instantiate (not load) the backend called `name`."""
    settings = settings or get_settings()
    known = available_backends(settings)
    if name not in known:
        raise InvalidInput(
            f"unknown backend {name!r}; available: {', '.join(sorted(known))}",
            code="unknown_backend",
        )
    module_name, _, attr = known[name].partition(":")
    cls = getattr(importlib.import_module(module_name), attr)
    backend: Backend = cls(settings)
    return backend
