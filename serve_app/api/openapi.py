"""The OpenAPI document, typed enough to generate a client from: the generation options as a
schema (JSON body and multipart form), task status and error-code enums, the error body, the
server-sent events of a task's stream, the webhook payloads, and examples."""

from __future__ import annotations

import re
from collections import Counter
from functools import lru_cache
from importlib import resources
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from serve_app.backends.base import GenerationOptions

REF = "#/components/schemas/{model}"

OPTIONS_EXAMPLE = {"formats": ["glb", "stl"], "seed": 3, "texture_size": 1024, "face_limit": 20000}
TASK_EXAMPLE = {
    "id": "0b5f3c52-6a53-4a8e-9a57-2f0d8a2b9c11",
    "status": "succeeded",
    "backend": "cpu",
    "progress": 1.0,
    "stage": "done",
    "queue_position": None,
    "queue_position_estimated": None,
    "attempt": 1,
    "max_attempts": 3,
    "created_at": "2026-01-05T10:00:00Z",
    "started_at": "2026-01-05T10:00:01Z",
    "finished_at": "2026-01-05T10:00:09Z",
    "timings": {"queued_s": 1.0, "running_s": 8.0, "total_s": 9.0, "generate_s": 7.2},
    "options": {"backend": "cpu", "seed": 3, "formats": ["glb", "stl"]},
    "error": None,
    "result": {
        "files": [
            {
                "format": "glb",
                "url": "/api/v1/task/0b5f3c52-6a53-4a8e-9a57-2f0d8a2b9c11/result/glb",
                "bytes": 812345,
                "media_type": "model/gltf-binary",
                "ready": True,
            },
            {
                "format": "stl",
                "url": "/api/v1/task/0b5f3c52-6a53-4a8e-9a57-2f0d8a2b9c11/result/stl",
                "bytes": None,
                "media_type": "model/stl",
                "ready": False,
            },
        ],
        "preview_url": "/api/v1/task/0b5f3c52-6a53-4a8e-9a57-2f0d8a2b9c11/preview",
        "preview_ready": True,
        "turntable_url": "/api/v1/task/0b5f3c52-6a53-4a8e-9a57-2f0d8a2b9c11/turntable",
        "stats": {"faces": 20000},
    },
    "batch_id": None,
    "expired_at": None,
    "links": {"self": "/api/v1/task/0b5f3c52-6a53-4a8e-9a57-2f0d8a2b9c11"},
}

_CODE = re.compile(r"""\bcode\s*=\s*["']([a-z][a-z0-9_]*)["']""")


@lru_cache(maxsize=1)
def known_error_codes() -> list[str]:
    """Every error code the package can answer with, read from its own source (so the enum
    never falls behind the code). Clients must still accept codes they do not know."""
    codes: set[str] = set()
    root = resources.files("serve_app")

    def walk(folder: Any) -> None:
        for entry in folder.iterdir():
            if entry.is_dir() and entry.name not in ("static", "__pycache__"):
                walk(entry)
            elif entry.name.endswith(".py"):
                codes.update(_CODE.findall(entry.read_text()))

    walk(root)
    from serve_app.api.app import _HTTP_CODES

    codes.update(_HTTP_CODES.values())
    codes.update({"invalid_request", "request_timeout", "internal_error", "http_error"})
    return sorted(codes)


def _options_schema(components: dict[str, Any]) -> dict[str, Any]:
    """GenerationOptions as a component (its own $defs hoisted next to it)."""
    schema = GenerationOptions.model_json_schema(ref_template=REF)
    for name, definition in schema.pop("$defs", {}).items():
        components.setdefault(name, definition)
    schema["examples"] = [OPTIONS_EXAMPLE]
    return schema


def _generate_body(options: dict[str, Any]) -> dict[str, Any]:
    photo = "A photo: JPEG, PNG, WebP, HEIC/HEIF or AVIF."
    form_fields = {
        name: {**prop, "description": prop.get("description", f"Option {name}.")}
        for name, prop in options["properties"].items()
    }
    return {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "minItems": 1,
                            "description": f"One or more photos of one object. {photo}",
                        },
                        "options": {
                            "type": "string",
                            "description": "All options as one JSON object (GenerationOptions); "
                            "or send each option as its own field below.",
                            "examples": ['{"formats": ["glb", "stl"], "seed": 3}'],
                        },
                        **form_fields,
                    },
                },
                "encoding": {"formats": {"style": "form", "explode": True}},
            },
            "application/json": {
                "schema": {"$ref": REF.format(model="GenerateRequest")},
                "examples": {
                    "base64": {
                        "summary": "One photo as a data URI",
                        "value": {
                            "image": "data:image/jpeg;base64,/9j/4AAQSkZJRg…",
                            "options": OPTIONS_EXAMPLE,
                        },
                    },
                    "url": {
                        "summary": "A photo by URL",
                        "value": {
                            "image_url": "https://example.com/mug.jpg",
                            "options": {"formats": ["glb"]},
                        },
                    },
                },
            },
        },
    }


def _generate_request() -> dict[str, Any]:
    return {
        "type": "object",
        "title": "GenerateRequest",
        "description": "JSON body of POST /api/v1/generate: `image`, `images` or `image_url`, "
        "and options (in `options`, or at the top level).",
        "properties": {
            "image": {
                "type": "string",
                "description": "One photo as base64 or a data:image/…;base64, URI.",
            },
            "images": {
                "type": "array",
                "items": {"type": "string"},
                "maxItems": 8,
                "description": "Several photos of one object (base64 or data URIs).",
            },
            "image_url": {
                "type": "string",
                "format": "uri",
                "maxLength": 2048,
                "description": "An http(s) URL the server fetches (public addresses only).",
            },
            "options": {"$ref": REF.format(model="GenerationOptions")},
        },
    }


def _stream_events() -> dict[str, dict[str, Any]]:
    """Schemas of the `data:` of each server-sent event of /task/{id}/stream."""

    def event(name: str, data_ref: str, what: str) -> dict[str, Any]:
        return {
            "type": "object",
            "title": name,
            "description": what,
            "required": ["event", "data"],
            "properties": {
                "event": {"type": "string", "const": name.removeprefix("TaskStream").lower()},
                "id": {
                    "type": "string",
                    "description": "Timeline events only: the event id "
                    "(send it back as Last-Event-ID).",
                },
                "data": {"$ref": REF.format(model=data_ref)},
            },
        }

    return {
        "TaskStreamTask": event(
            "TaskStreamTask", "Task", "`event: task`: the whole task, on every change."
        ),
        "TaskStreamTimeline": event(
            "TaskStreamTimeline", "TaskEvent", "`event: timeline`: one entry of the timeline."
        ),
        "TaskStreamError": event(
            "TaskStreamError", "ErrorResponse", "`event: error`: the stream ends with an error."
        ),
        "TaskStreamEvent": {
            "title": "TaskStreamEvent",
            "description": "One server-sent event (`event:` line, then `data:` as JSON). The "
            "stream ends after the task event with a final status.",
            "oneOf": [
                {"$ref": REF.format(model="TaskStreamTask")},
                {"$ref": REF.format(model="TaskStreamTimeline")},
                {"$ref": REF.format(model="TaskStreamError")},
            ],
            "discriminator": {
                "propertyName": "event",
                "mapping": {
                    "task": REF.format(model="TaskStreamTask"),
                    "timeline": REF.format(model="TaskStreamTimeline"),
                    "error": REF.format(model="TaskStreamError"),
                },
            },
        },
    }


def enrich(doc: dict[str, Any]) -> dict[str, Any]:
    """Add what FastAPI cannot infer from the routes (bodies parsed by hand, SSE, enums)."""
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    options = _options_schema(components)
    components["GenerationOptions"] = options
    components["GenerateRequest"] = _generate_request()
    components["ErrorCode"] = {
        "type": "string",
        "title": "ErrorCode",
        "enum": known_error_codes(),
        "description": "Error codes this server version answers with; new versions may add "
        "codes, so treat unknown ones like their HTTP status.",
    }
    if "ErrorBody" in components:
        components["ErrorBody"]["properties"]["code"] = {
            "anyOf": [{"$ref": REF.format(model="ErrorCode")}, {"type": "string"}],
            "title": "Code",
            "description": "Machine-readable error code (see ErrorCode).",
            "examples": ["invalid_image"],
        }
    components.update(_stream_events())
    if "Task" in components:
        components["Task"]["examples"] = [TASK_EXAMPLE]

    generate = doc["paths"].get("/api/v1/generate", {}).get("post")
    if generate is not None:
        generate["requestBody"] = _generate_body(options)
        generate["parameters"] = [
            p for p in generate.get("parameters", []) if p.get("name") != "idempotency-key"
        ] + [
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "schema": {"type": "string", "maxLength": 200},
                "description": "Send the same key again to get the same task back instead of a "
                "second one; reusing it for a different request answers 422 "
                "idempotency_key_reused.",
            }
        ]
    stream = doc["paths"].get("/api/v1/task/{task_id}/stream", {}).get("get")
    if stream is not None:
        stream["responses"]["200"] = {
            "description": "`text/event-stream`: `event: timeline` (with `id:`) for each "
            "timeline entry, `event: task` with the whole task on each change, `event: error` "
            "if the task disappears; comments (`: keep-alive`) every 15 s. Resume with "
            "`Last-Event-ID`.",
            "content": {
                "text/event-stream": {
                    "schema": {"$ref": REF.format(model="TaskStreamEvent")},
                    "example": 'event: task\ndata: {"id": "…", "status": "running", …}\n\n',
                }
            },
        }
    return doc


def _binary_responses(doc: dict[str, Any]) -> None:
    """File downloads (image/png, model/gltf-binary, …) as binary strings, so generators
    produce a download function instead of skipping the route."""
    for operations in doc["paths"].values():
        for operation in operations.values():
            for response in operation.get("responses", {}).values():
                for media_type, content in response.get("content", {}).items():
                    if "json" not in media_type and not content.get("schema"):
                        content["schema"] = {"type": "string", "format": "binary"}


def _short_operation_ids(doc: dict[str, Any]) -> None:
    """operationId = the handler's name (get_task, create_webhook) where that name is unique:
    generated clients then read like the API, not like its URL paths. FastAPI's own ids are
    `<name><path with non-word characters as _>_<method>`."""
    found: list[tuple[dict[str, Any], str]] = []
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            suffix = re.sub(r"\W", "_", path) + "_" + method
            if operation.get("operationId", "").endswith(suffix):
                found.append((operation, operation["operationId"][: -len(suffix)]))
    counts = Counter(name for _, name in found)
    for operation, name in found:
        if name and counts[name] == 1:
            operation["operationId"] = name


def install(app: FastAPI) -> None:
    """Serve the enriched document at /openapi.json (and so at /docs)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
                webhooks=app.webhooks.routes,
                tags=app.openapi_tags,
            )
            _short_operation_ids(doc)
            _binary_responses(doc)
            app.openapi_schema = enrich(doc)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
