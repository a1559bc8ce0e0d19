"""What the web page needs beyond its static files: the list of output formats, as a JavaScript
module generated from the one registry (public, like the page itself)."""

from __future__ import annotations

import json

from fastapi import APIRouter, Response

from serve_app.formats import FORMATS

router = APIRouter(include_in_schema=False)


@router.get("/formats.js")
def formats_module() -> Response:
    """`export const FORMATS = [{id, label, use}, ...]` from serve_app/formats.py."""
    entries = [{"id": f.name, "label": f.label, "use": f.use} for f in FORMATS.values()]
    body = (
        f"// Generated from serve_app/formats.py.\nexport const FORMATS = {json.dumps(entries)};\n"
    )
    return Response(body, media_type="text/javascript", headers={"Cache-Control": "no-cache"})
