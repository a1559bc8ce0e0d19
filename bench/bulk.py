"""Bulk conversion throughput: photos per minute on the CPU backend with one and with two
generator replicas, and the scaling ratio, side by side in one run.

    .venv/bin/python bench/bulk.py [--photos 40] [--side 512] [PHOTO ...]

For each replica count it starts the real stack (`photo3d serve`, embedded PostgreSQL, Ray
Serve, generator-cpu pinned to N replicas), submits jobs/bulk_convert.py over the same folder as
a real Ray Job (`ray job submit`), and times the batch from the job's submission until every
item has ended. Photos: the given files (e.g. ../shared/evaldata/photos/*/*), cycled up to
--photos and resized to --side, each made distinct by a one-pixel mark so no item is skipped as
already converted; without files, generated test photos. Prints the machine and the commit.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import commit as bench_commit  # noqa: E402
from tests.support import pg  # noqa: E402
from tests.support.images import object_photo  # noqa: E402
from tests.support.stack import free_port, run_stack  # noqa: E402

RAY = str(Path(sys.executable).with_name("ray"))


def make_photos(folder: Path, sources: list[Path], count: int, side: int) -> None:
    folder.mkdir(parents=True)
    cycle = itertools.cycle(sources) if sources else None
    for i in range(count):
        if cycle is None:
            data = object_photo(size=side, seed=1000 + i)
            image = Image.open(io.BytesIO(data)).convert("RGB")
        else:
            image = ImageOps.exif_transpose(Image.open(next(cycle)))
            image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
            image.thumbnail((side, side))
        image.putpixel((0, 0), (i % 256, i // 256 % 256, 7) + (() if image.mode == "RGB" else (0,)))
        image.save(folder / f"photo{i:04d}.png")


def run_batch(photos: Path, replicas: int, admin_url: str, work: Path) -> dict[str, float]:
    dashboard = free_port()
    env = {"PHOTO3D_DASHBOARD_PORT": str(dashboard), "PHOTO3D_MAX_BATCH_IN_FLIGHT": "16"}
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    for deployment in config["applications"][0]["deployments"]:
        if deployment["name"] == "generator-cpu":
            deployment.pop("autoscaling_config", None)
            deployment["num_replicas"] = replicas
            deployment["ray_actor_options"]["num_cpus"] = 0.5
    config_path = work / f"serve_config.{replicas}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env["PHOTO3D_SERVE_CONFIG"] = str(config_path)
    for url in pg.clone_database(admin_url, prefix=f"bench{replicas}"):
        with run_stack(work / f"stack{replicas}", url, env=env):
            out = work / f"out{replicas}"
            started = time.monotonic()
            command = [
                RAY, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}",
                "--working-dir", str(ROOT), "--", "python", "-m", "jobs.bulk_convert",
                "--input", str(photos), "--output", str(out),
            ]  # fmt: skip
            for _ in range(5):  # the job server asks to retry while its agent starts
                done = subprocess.run(command, capture_output=True, text=True)
                if "No available agent" not in done.stdout + done.stderr:
                    break
                time.sleep(3)
            seconds = time.monotonic() - started
            if done.returncode != 0:
                raise SystemExit(f"the job failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
            report = json.loads((out / "report.json").read_text())
    return {
        "seconds": seconds,
        "succeeded": report["counts"].get("succeeded", 0),
        "photos_per_minute": report["counts"].get("succeeded", 0) / seconds * 60,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("photos", nargs="*", type=Path)
    parser.add_argument("--photos", dest="count", type=int, default=40)
    parser.add_argument("--side", type=int, default=512)
    args = parser.parse_args()
    commit = bench_commit()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.processor() or ''}")
    print(f"commit: {commit}; {args.count} photos at {args.side} px")
    with tempfile.TemporaryDirectory(prefix="photo3d-bench-bulk-") as tmp:
        work = Path(tmp)
        photos = work / "photos"
        make_photos(photos, [p for p in args.photos if p.is_file()], args.count, args.side)
        admin_url, server = pg.admin_url(work / "pg")
        pg.make_template(admin_url)
        results = {n: run_batch(photos, n, admin_url, work) for n in (1, 2)}
        del server
    print("| generator-cpu replicas | photos | seconds | photos/min |")
    print("|---|---|---|---|")
    for n, r in results.items():
        print(f"| {n} | {r['succeeded']} | {r['seconds']:.1f} | {r['photos_per_minute']:.1f} |")
    ratio = results[2]["photos_per_minute"] / results[1]["photos_per_minute"]
    print(f"scaling 1 -> 2 replicas: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
