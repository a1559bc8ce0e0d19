"""The serving path against a bare app doing comparable work, side by side in one run.

    .venv/bin/python bench/api.py [--photo PHOTO.jpg | --photo-kb 635] [--requests 400]
        [--concurrency 1,8,32] [--rounds 3] [--no-proxy] [--env KEY=VALUE]

photo3d: the real stack (`photo3d serve`: embedded PostgreSQL, Ray Serve, the Ingress), loaded
on its own port ("direct": the Ingress replica, Ray's direct ingress, the default) and through
Ray Serve's proxy in front of the same replica ("proxy"), with the account limits raised and
the tasks sent to a backend whose generator has no replica (so no generation competes for the
CPUs). Bare: one uvicorn process with a FastAPI app that parses the
multipart upload, checks the image header with Pillow, writes the file, INSERTs the task row into
the same PostgreSQL and answers 202 JSON; its GET reads the row back. Both answer the same
requests from `hey` (Debian's package) at each concurrency. Prints the machine and the commit.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine_and_commit  # noqa: E402
from tests.support import pg  # noqa: E402
from tests.support.images import object_photo  # noqa: E402
from tests.support.stack import free_port, run_stack  # noqa: E402

BOUNDARY = "photo3dbenchboundary"
PAUSED = "fake-slow"  # a backend whose generator has no replica during the run


def multipart(photo: bytes, options: dict | None = None) -> bytes:
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="p.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n".encode()
        + photo
        + b"\r\n"
    ]
    if options:
        parts.append(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="options"\r\n\r\n'
            f"{json.dumps(options)}\r\n".encode()
        )
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def hey(url: str, *, n: int, c: int, body: Path | None = None) -> dict[str, float]:
    command = ["hey", "-n", str(n), "-c", str(c), "-t", "60"]
    if body is not None:
        command += [
            "-m",
            "POST",
            "-D",
            str(body),
            "-T",
            f"multipart/form-data; boundary={BOUNDARY}",
        ]
    out = subprocess.run([*command, url], capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]
    p50 = re.search(r"50%+ in ([\d.]+) secs", out)
    p99 = re.search(r"99%+ in ([\d.]+) secs", out)
    codes = dict(re.findall(r"\[(\d{3})\]\s+(\d+) responses", out))
    return {
        "rps": rate,
        "p50_ms": float(p50[1]) * 1000 if p50 else float("nan"),
        "p99_ms": float(p99[1]) * 1000 if p99 else float("nan"),
        "codes": codes,  # type: ignore[dict-item]
    }


def grained_photo(target_bytes: int) -> bytes:
    """The generated 1024² photo with film grain over it, saved as a JPEG of about
    `target_bytes` (a camera's photo is mostly grain and texture to a JPEG encoder)."""
    import io

    import numpy as np
    from PIL import Image

    base = np.asarray(Image.open(io.BytesIO(object_photo(1024, seed=3))).convert("RGB"), float)
    grain = np.random.default_rng(3).normal(0, 1, base.shape)
    low, high = 0.0, 64.0
    for _ in range(12):  # bisect the grain's strength for the size
        sigma = (low + high) / 2
        out = io.BytesIO()
        Image.fromarray((base + sigma * grain).clip(0, 255).astype(np.uint8)).save(
            out, format="JPEG", quality=90
        )
        low, high = (sigma, high) if out.tell() < target_bytes else (low, sigma)
    return out.getvalue()


def bench_config(work: Path) -> Path:
    """serve_config.yaml with the paused backend: its generator autoscales on requests (it gets
    none), so it stays at 0 replicas; the cpu generator stays for /health."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    app = config["applications"][0]
    app["args"]["backends"] = ["cpu", PAUSED]
    deployments = [d for d in app["deployments"] if d["name"] in ("Ingress", "generator-cpu")]
    for deployment in deployments:
        if deployment["name"] == "generator-cpu":
            deployment.pop("autoscaling_config", None)
            deployment["num_replicas"] = 1
            deployment["ray_actor_options"]["num_cpus"] = 0.25
    deployments.append(
        {
            "name": f"generator-{PAUSED}",
            "ray_actor_options": {"num_cpus": 0.25},
            "autoscaling_config": {"min_replicas": 0, "initial_replicas": 0, "max_replicas": 1},
        }
    )
    app["deployments"] = deployments
    path = work / "serve_config.bench.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_bare(database_url: str, work: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url, "BARE_DIR": str(work / "bare")}
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "bench.bare_app:app", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning", "--no-access-log"],
        cwd=ROOT, env=env, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_for(f"{url}/health")
    return process, url


def cpu_seconds(root_pid: int) -> float:
    """CPU seconds (user + system) of a process and its descendants, PostgreSQL left out (both
    apps share one server). Less sensitive to other load on the machine than requests/s."""
    total = 0.0
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    for proc in procs:
        try:
            if "postgres" in proc.name():
                continue
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            continue
    return total


def run_both(
    label: str,
    urls: dict[str, str],
    make_args,
    concurrencies,
    n,
    pids: dict[str, int],
    rounds: int = 1,
) -> list[dict]:
    """Each concurrency against every target in turn, `rounds` times (the order of the targets
    alternating between rounds, so that neither always runs first); one table row per target
    with its medians over the rounds, its ratio to the bare app (the median of the rounds'
    ratios, each from runs just before or after each other) and the server's CPU per request."""
    rows = []
    for c in concurrencies:
        runs: dict[str, list[dict]] = {name: [] for name in urls}
        for r in range(rounds):
            for name in list(urls) if r % 2 == 0 else list(reversed(urls)):
                target, body = make_args(name, urls[name])
                hey(target, n=max(c, n // 10), c=c, body=body)  # warm-up
                before = cpu_seconds(pids[name])
                run = hey(target, n=n, c=c, body=body)
                answered = sum(int(v) for v in run["codes"].values()) or 1
                run["cpu_ms"] = (cpu_seconds(pids[name]) - before) * 1000 / answered
                runs[name].append(run)
        row: dict = {"what": label, "c": c}
        for name, measured in runs.items():
            row[name] = {
                key: statistics.median(m[key] for m in measured)
                for key in ("rps", "p50_ms", "p99_ms", "cpu_ms")
            }
            row[name]["codes"] = measured[-1]["codes"]
            row[name]["ratios"] = [
                m["rps"] / b["rps"] for m, b in zip(measured, runs["bare"], strict=True)
            ]
        rows.append(row)
        b = row["bare"]
        for name in urls:
            if name == "bare":
                continue
            p = row[name]
            ratios = p["ratios"]
            spread = f" ({min(ratios):.2f}–{max(ratios):.2f})" if len(ratios) > 1 else ""
            print(
                f"| {label} | {name} | {c} | {p['rps']:.1f} | {p['p50_ms']:.0f} | "
                f"{p['p99_ms']:.0f} | {p['cpu_ms']:.1f} | {b['rps']:.1f} | {b['p50_ms']:.0f} | "
                f"{b['p99_ms']:.0f} | {b['cpu_ms']:.1f} | "
                f"{statistics.median(ratios):.2f}{spread} | {p['codes']} |",
                flush=True,
            )
    return rows


def wait_for(url: str, seconds: float = 60) -> None:
    """Until `url` answers 200 (a health check), or SystemExit."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not answer")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--photo", type=Path, help="a JPEG (default: a generated 1024² photo)")
    parser.add_argument(
        "--photo-kb",
        type=int,
        help="a generated 1024² JPEG grained to about this size (issue 11's photo: 635)",
    )
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure each pair this many times, alternating; medians (other load on the "
        "machine moves single runs by ±30 %%)",
    )
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument(
        "--env", action="append", default=[], help="KEY=VALUE for photo3d serve (e.g. Ray's)"
    )
    parser.add_argument(
        "--no-proxy",
        action="store_true",
        help="leave out the run through Ray's proxy (photo3d's default is direct ingress)",
    )
    args = parser.parse_args()
    if shutil.which("hey") is None:
        raise SystemExit("needs `hey` (apt-get install hey)")
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    if args.photo:
        photo = args.photo.read_bytes()
    elif args.photo_kb:
        photo = grained_photo(args.photo_kb * 1000)
    else:
        photo = object_photo(1024, seed=3, fmt="JPEG")
    print(machine_and_commit())
    print(f"load average before the run: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        f"photo: {len(photo)} bytes; {args.requests} requests per run after a warm-up; "
        f"{args.rounds} round(s), medians"
    )
    with tempfile.TemporaryDirectory(prefix="p3d-api-") as tmp:
        work = Path(tmp)
        admin, server = pg.admin_url(work / "pg")
        pg.make_template(admin)
        bodies = {
            "photo3d": work / "photo3d.body",
            "bare": work / "bare.body",
        }
        bodies["photo3d"].write_bytes(multipart(photo, {"backend": PAUSED}))
        bodies["bare"].write_bytes(multipart(photo))
        env = {
            "PHOTO3D_SERVE_CONFIG": str(bench_config(work)),
            "PHOTO3D_EXTRA_BACKENDS": f"{PAUSED}=tests.support.fake_backends:SlowFakeBackend",
            "PHOTO3D_BACKENDS": f"cpu,{PAUSED}",
            "PHOTO3D_MAX_ACTIVE_TASKS": "100000000",
            "PHOTO3D_RATE_LIMIT_REQUESTS": "1000000000",
            "PHOTO3D_RATE_LIMIT_ACCOUNT_REQUESTS": "1000000000",
            "PHOTO3D_MAX_UPLOADS_PER_ACCOUNT": "1000",  # one tenant here: its fair share is all
            **dict(item.split("=", 1) for item in args.env),
        }
        # Direct ingress (the default) still runs Ray's proxy on the side, in front of the same
        # replica: the two paths are measured side by side.
        proxy_port = free_port()
        env["PHOTO3D_PROXY_PORT"] = str(proxy_port)
        if args.env:
            print(f"photo3d serve with {' '.join(args.env)}")
        clones = [pg.clone_database(admin, prefix=p) for p in ("api", "bare")]
        photo3d_db, bare_db = (next(clone) for clone in clones)  # kept until the end
        bare, bare_url = start_bare(bare_db, work)
        try:
            with run_stack(work / "s", photo3d_db, env=env) as stack:
                direct = env.get("PHOTO3D_INGRESS_MODE", "direct") == "direct"
                urls = {"direct" if direct else "proxy": stack.url, "bare": bare_url}
                if direct and not args.no_proxy:
                    urls["proxy"] = f"http://127.0.0.1:{proxy_port}"
                    wait_for(f"{urls['proxy']}/health")
                pids = dict.fromkeys(urls, stack.process.pid) | {"bare": bare.pid}
                print("| request | path | c | req/s | p50 ms | p99 ms | CPU ms/req | bare req/s "
                      "| p50 ms | p99 ms | CPU ms/req | ratio | codes |")  # fmt: skip
                print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
                run_both(
                    "POST /generate",
                    urls,
                    lambda name, url: (
                        f"{url}/generate" if name == "bare" else f"{url}/api/v1/generate",
                        bodies["bare" if name == "bare" else "photo3d"],
                    ),
                    concurrencies,
                    args.requests,
                    pids,
                    args.rounds,
                )
                with httpx.Client() as client:
                    task = client.post(
                        f"{stack.url}/api/v1/generate",
                        files={"image": ("p.jpg", photo, "image/jpeg")},
                        data={"options": json.dumps({"backend": PAUSED})},
                    ).json()["id"]
                    bare_task = client.post(
                        f"{bare_url}/generate", files={"image": ("p.jpg", photo, "image/jpeg")}
                    ).json()["id"]
                run_both(
                    "GET /task/{id}",
                    urls,
                    lambda name, url: (
                        f"{url}/task/{bare_task}"
                        if name == "bare"
                        else f"{url}/api/v1/task/{task}",
                        None,
                    ),
                    concurrencies,
                    args.requests * 2,
                    pids,
                    args.rounds,
                )
        finally:
            os.killpg(bare.pid, 9)
            bare.wait()
            for clone in clones:
                clone.close()
            del server
    return 0


if __name__ == "__main__":
    sys.exit(main())
