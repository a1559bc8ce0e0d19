"""Before/after turntables of the CPU backend on photo-like scenes (docs/cpu-backend.md).

    .venv/bin/python bench/turntables.py /work/shared/evaldata/meshes OUT_DIR \\
        YcbScissors:1:photo-cloth spot:0:photo-near ...

Each case (scan name, view index, background style of bench/quality.py) is rendered into its
scene, reconstructed by the backend before issue #17 (cpu-legacy) and as it is (cpu), and
written as OUT_DIR/<case>.webp: the photo, then four turns of each model (top row before,
bottom row after), plus an animated WebP turntable of each (<case>-turntable-legacy.webp,
<case>-turntable.webp).
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from PIL import Image, ImageSequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import quality

from serve_app.backends.base import GenerationOptions
from serve_app.backends.cpu import CPUBackend
from serve_app.preview import render_turntable
from serve_app.settings import Settings

SIZE = 192
FRAMES = 12


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("meshes", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("cases", nargs="+", help="scan:view:style")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    paths = {quality.load_scan(p, "auto").name: p for p in sorted(args.meshes.rglob("*.obj"))}
    for case in args.cases:
        name, view_index, style = case.split(":")
        scan = quality.load_scan(paths[name], "auto")
        azimuth, elevation = quality.VIEWS[int(view_index)]
        view = quality.render(scan, azimuth, elevation, 512)
        image = quality.photo(view, style, seed=int(view_index) + 7 * len(scan.name))
        rows = []
        for legacy in (True, False):
            asset = CPUBackend(Settings(), legacy=legacy).generate(
                [image], GenerationOptions(), lambda f, s: None
            )
            webp = render_turntable(asset.glb, size=SIZE, frames=FRAMES)
            suffix = "-turntable-legacy" if legacy else "-turntable"
            (args.out / f"{name}-{view_index}-{style}{suffix}.webp").write_bytes(webp)
            frames = [
                f.convert("RGBA") for f in ImageSequence.Iterator(Image.open(io.BytesIO(webp)))
            ]
            turns = [frames[i * FRAMES // 4] for i in range(4)]
            row = Image.new("RGBA", (SIZE * 4, SIZE), (255, 255, 255, 255))
            for i, frame in enumerate(turns):
                row.alpha_composite(frame, (i * SIZE, 0))
            rows.append(row)
        sheet = Image.new("RGB", (SIZE * 6, SIZE * 2), (255, 255, 255))
        sheet.paste(image.resize((SIZE * 2, SIZE * 2)), (0, 0))
        for i, row in enumerate(rows):
            sheet.paste(row.convert("RGB"), (SIZE * 2, i * SIZE))
        sheet.save(args.out / f"{name}-{view_index}-{style}.webp", quality=85)
        print(f"wrote {name}-{view_index}-{style}.webp")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
