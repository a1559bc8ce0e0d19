"""The `cpu` backend: classical single-photo reconstruction, no GPU and no weights needed."""

from serve_app.backends.cpu.backend import CPUBackend

__all__ = ["CPUBackend"]
