"""Domain exceptions. The API turns them into `{"error": {"code", "message"}}` in one place.

They carry only plain attributes so they pickle cleanly across Ray processes.
"""

from __future__ import annotations


class Photo3DError(Exception):
    """Base class: a failure with a machine-readable code and a human message."""

    code = "internal_error"
    http_status = 500

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (type(self), self.message, self.code))

    def to_dict(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}


def _rebuild(cls: type[Photo3DError], message: str, code: str) -> Photo3DError:
    return cls(message, code=code)


class InvalidInput(Photo3DError):
    """The request is malformed or an option is out of range (422/400)."""

    code = "invalid_input"
    http_status = 422


class InvalidImage(InvalidInput):
    """The uploaded bytes are not a usable photo."""

    code = "invalid_image"
    http_status = 422


class UnsupportedMediaType(InvalidInput):
    code = "unsupported_media_type"
    http_status = 415


class PayloadTooLarge(InvalidInput):
    code = "payload_too_large"
    http_status = 413


class NoObjectFound(InvalidInput):
    """The photo has no object that can be separated from its background."""

    code = "no_object_found"
    http_status = 422


class NotFound(Photo3DError):
    code = "not_found"
    http_status = 404


class Gone(Photo3DError):
    """The thing existed but was deleted on purpose (e.g. an expired result)."""

    code = "gone"
    http_status = 410


class Conflict(Photo3DError):
    code = "conflict"
    http_status = 409


class ServiceUnavailable(Photo3DError):
    """A dependency (database, backend) is down; the client should retry later."""

    code = "service_unavailable"
    http_status = 503


class BackendUnavailable(Photo3DError):
    """A backend cannot run here (no GPU, missing weights, missing libraries)."""

    code = "backend_unavailable"
    http_status = 503


class GenerationFailed(Photo3DError):
    """The backend ran and failed for this input; retrying will not help."""

    code = "generation_failed"
    http_status = 500


class ArtifactStoreError(Photo3DError):
    code = "artifact_store_error"
    http_status = 503
