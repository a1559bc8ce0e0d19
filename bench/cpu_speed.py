"""Time the CPU backend per stage on real photos, on one core.

    .venv/bin/python bench/cpu_speed.py /work/shared/evaldata/photos/*/*.* [--side 1024] [--runs 5]

Each photo is decoded once and resized so its longest side is --side (0 keeps it as is), then
generated --runs times after one warm-up; the table shows the median seconds per stage.
"""

from __future__ import annotations

import os

# One core: fix the thread pools before numpy / OpenCV start them.
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"

import argparse  # noqa: E402
import itertools  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_app.backends.base import GenerationOptions  # noqa: E402
from serve_app.backends.cpu import CPUBackend  # noqa: E402
from serve_app.errors import Photo3DError  # noqa: E402
from serve_app.settings import Settings  # noqa: E402

STAGES = ("segmenting", "meshing", "texturing", "exporting")


def load_photo(path: Path, side: int) -> Image.Image:
    """Decode like the service does (EXIF-transposed, RGB or RGBA), then resize."""
    image = ImageOps.exif_transpose(Image.open(path))
    image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    if side > 0 and max(image.size) != side:
        scale = side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image


def time_once(
    backend: CPUBackend, image: Image.Image, options: GenerationOptions, clock: str = "wall"
) -> tuple[dict[str, float], dict[str, float | int | str], int]:
    """Seconds per stage (from the progress callbacks), stats and GLB size of one run.

    clock "wall" is elapsed time; "cpu" is this process's CPU time, which on a machine shared
    with other busy processes is far less noisy (one thread: the same on an idle machine)."""
    now = time.perf_counter if clock == "wall" else time.process_time
    marks: list[tuple[float, str]] = []
    start = now()
    asset = backend.generate([image], options, lambda _, stage: marks.append((now(), stage)))
    end = now()
    seconds = {stage: after - at for (at, stage), (after, _) in itertools.pairwise(marks)}
    seconds["total"] = end - start
    return seconds, asset.stats, len(asset.glb)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("photos", nargs="+", type=Path)
    parser.add_argument("--side", type=int, default=1024, help="longest side; 0 = as is")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--face-limit", type=int, default=GenerationOptions().face_limit)
    parser.add_argument("--texture-size", type=int, default=1024)
    parser.add_argument("--no-pin", action="store_true", help="do not pin to one CPU core")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed time; cpu: process CPU time (for a shared, busy machine)",
    )
    parser.add_argument(
        "--legacy", action="store_true", help="time the backend as it was before issue #17"
    )
    args = parser.parse_args()

    cv2.setNumThreads(1)
    if not args.no_pin and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    backend = CPUBackend(Settings(), legacy=args.legacy)
    backend.load()
    options = GenerationOptions(face_limit=args.face_limit, texture_size=args.texture_size)

    print(f"# {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()},")
    print(f"# opencv {cv2.__version__}, 1 thread, median of {args.runs} runs after 1 warm-up")
    print(
        f"# backend: cpu{' (legacy, before issue #17)' if args.legacy else ''}, clock {args.clock}"
    )
    header = ["photo", "size", "method", *STAGES, "total", "faces", "glb_kb", "watertight"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    totals: list[float] = []
    for path in args.photos:
        image = load_photo(path, args.side)
        try:
            time_once(backend, image, options)  # warm-up: imports, allocator, caches
            runs = [time_once(backend, image, options, args.clock) for _ in range(args.runs)]
        except Photo3DError as error:
            print(f"| {path.name} | {image.width}x{image.height} | {error.code}: {error.message} |")
            continue
        _, stats, glb_bytes = runs[-1]
        median = {key: statistics.median(run[0][key] for run in runs) for key in runs[0][0]}
        totals.append(median["total"])
        row = [
            path.name[:28],
            f"{image.width}x{image.height}",
            str(stats.get("segmentation", "")),
            *(f"{median.get(stage, 0.0):.3f}" for stage in STAGES),
            f"{median['total']:.3f}",
            str(stats["faces"]),
            f"{glb_bytes / 1024:.0f}",
            str(stats["watertight"]),
        ]
        print("| " + " | ".join(row) + " |")
    if totals:
        print(
            f"\nmean total {statistics.mean(totals):.3f} s, max {max(totals):.3f} s "
            f"over {len(totals)} photos"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
