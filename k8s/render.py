"""Write k8s/base/rayservice.photo3d.yaml from its template, embedding serve_config.yaml verbatim.

serve_config.yaml stays the single source of the Serve deploy config: run `python k8s/render.py`
after changing it; tests/unit/test_k8s.py fails until you do."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "k8s" / "base" / "rayservice.photo3d.template.yaml"
OUTPUT = ROOT / "k8s" / "base" / "rayservice.photo3d.yaml"
MARKER = "  serveConfigV2: |\n"


def render() -> str:
    """The manifest text: the template with serve_config.yaml indented under serveConfigV2."""
    template = TEMPLATE.read_text()
    if MARKER not in template:
        raise SystemExit(f"{TEMPLATE} lacks the serveConfigV2 marker")
    config = (ROOT / "serve_config.yaml").read_text()
    body = "".join(f"    {line}" if line.strip() else "\n" for line in config.splitlines(True))
    return template.replace(MARKER, MARKER + body)


if __name__ == "__main__":
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT.relative_to(ROOT)}", file=sys.stderr)
