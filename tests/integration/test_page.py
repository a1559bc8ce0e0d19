"""The web page's list of output formats comes from the server's one registry."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient

from serve_app.backends.base import GenerationOptions
from serve_app.cli import build_parser
from serve_app.formats import FORMATS


def test_the_page_lists_every_format_the_api_accepts(client: TestClient) -> None:
    response = client.get("/formats.js")  # public, like the page that imports it
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/javascript")
    listed = json.loads(response.text.split("export const FORMATS = ", 1)[1].rstrip().rstrip(";"))
    assert [f["id"] for f in listed] == list(FORMATS)
    assert all(f["label"] and f["use"] for f in listed)
    for fmt in FORMATS:  # every listed format is one a task may ask for
        assert GenerationOptions(formats=[fmt]).formats == [fmt]
    generate = build_parser().parse_args(["generate", "p.png", "--format", "usdz"])
    assert generate.format == "usdz"
