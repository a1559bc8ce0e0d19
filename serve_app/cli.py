"""The `photo3d` command: serve, migrate, generate (local, no server), weights."""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from serve_app.embedded_pg import database_url_or_embedded
from serve_app.formats import FORMATS
from serve_app.settings import Settings, get_settings

log = logging.getLogger("photo3d")


def cmd_migrate(args: argparse.Namespace) -> int:
    from serve_app.store.migrate import migrate

    settings = get_settings()
    url, _server = database_url_or_embedded(settings)
    applied = migrate(url)
    print(f"applied migrations: {applied}" if applied else "database is up to date")
    return 0


def gpu_available() -> bool:
    """Whether this machine has an NVIDIA GPU (without importing torch)."""
    return shutil.which("nvidia-smi") is not None and Path("/dev/nvidia0").exists()


def select_backends(
    config: dict[str, Any], wanted: list[str] | None, has_gpu: bool
) -> dict[str, Any]:
    """The deploy config with only the chosen backends' generator deployments.

    Without PHOTO3D_BACKENDS, backends whose deployments ask for a GPU are left out on a machine
    that has none (they would wait for a GPU forever)."""
    from serve_app.deployments import generator_name

    config = yaml.safe_load(yaml.safe_dump(config))  # deep copy
    for app in config["applications"]:
        deployments = {d["name"]: d for d in app.get("deployments", [])}
        backends: list[str] = app.get("args", {}).get("backends", ["cpu"])
        if wanted is not None:
            unknown = sorted(set(wanted) - set(backends))
            if unknown:
                raise SystemExit(f"PHOTO3D_BACKENDS names {unknown}, not in {backends}")
            chosen = [b for b in backends if b in wanted]
        else:
            chosen = [
                b
                for b in backends
                if has_gpu
                or not deployments.get(generator_name(b), {})
                .get("ray_actor_options", {})
                .get("num_gpus")
            ]
        dropped = sorted(set(backends) - set(chosen))
        if dropped:
            print(
                f"note: not deploying {', '.join(dropped)} (no GPU here or not in PHOTO3D_BACKENDS)"
            )
        app.setdefault("args", {})["backends"] = chosen
        keep = {generator_name(b) for b in chosen} | {"Ingress", "QueueMonitor"}
        app["deployments"] = [d for d in app.get("deployments", []) if d["name"] in keep]
    return config


def _artifacts_ready(settings: Settings) -> bool:
    """The artifact store works and a URL signing key exists (one is made in the run folder for
    local use when PHOTO3D_URL_SIGNING_KEY is unset); else say why, before Ray starts."""
    from serve_app.artifacts import open_artifact_store
    from serve_app.downloads import load_signing_key
    from serve_app.errors import Photo3DError

    try:
        if not settings.artifact_url:
            settings.artifacts_path.mkdir(parents=True, exist_ok=True)
        open_artifact_store(settings).check()
        load_signing_key(settings, create=True)
    except Photo3DError as exc:
        print(f"error ({exc.code}): {exc.message}", file=sys.stderr)
        return False
    return True


FORWARDED_ENV = (
    "PHOTO3D_",
    "AUTH_REQUIRED",
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
)
# Never sent with the app: the deployed config (runtime_env included) is readable by anyone who
# can read the cluster's Serve status or dashboard. Each node's own environment provides these.
SECRET_MARKERS = ("DATABASE_URL", "KEY", "SECRET", "TOKEN", "PASSWORD")


def forward_settings(config: dict[str, Any]) -> list[str]:
    """Add this process's non-secret settings (PHOTO3D_*, the S3 endpoint and region) to every
    application's runtime_env, keeping what the config already sets; returns the secrets left
    out (names only), which the cluster's nodes must have in their own environment."""
    env, secrets = {}, []
    for name, value in os.environ.items():
        if not name.startswith(FORWARDED_ENV):
            continue
        if any(marker in name for marker in SECRET_MARKERS):
            secrets.append(name)
        else:
            env[name] = value
    for app in config["applications"]:
        runtime_env = app.setdefault("runtime_env", {})
        runtime_env["env_vars"] = {**env, **runtime_env.get("env_vars", {})}
    return sorted(secrets)


def serve_deploy_config(settings: Settings) -> dict[str, Any]:
    """serve_config.yaml with the backends this machine can run and our HTTP host and port."""
    config = yaml.safe_load(settings.serve_config.read_text())
    wanted = os.environ.get("PHOTO3D_BACKENDS")
    config = select_backends(
        config,
        [b.strip() for b in wanted.split(",") if b.strip()] if wanted else None,
        gpu_available(),
    )
    config["http_options"] = {
        **config.get("http_options", {}),
        "host": settings.host,
        "port": settings.port,
    }
    return config


def use_direct_ingress(config: dict[str, Any], settings: Settings) -> str | None:
    """Let the Ingress replica answer on settings.port itself (Ray Serve's direct ingress) and
    move Ray's proxy to an internal loopback port. Returns why it cannot, or None.

    Ray reads these variables in its controller and replicas, which inherit this process's
    environment: so only for a cluster this process starts. The replica's port range is the
    one port; a replica that is replaced gets it back at once (no quarantine: that is for
    HAProxy's server lists) and drains without Ray's 30 s wait for a load balancer."""
    ingress: dict[str, Any] = next(
        (d for app in config["applications"] for d in app.get("deployments", [])
         if d.get("name") == "Ingress"),
        {},
    )  # fmt: skip
    if ingress.get("autoscaling_config") or int(ingress.get("num_replicas", 1)) != 1:
        return "the Ingress has more than one replica (direct ingress serves one per machine)"
    os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
    os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] = str(settings.port)
    os.environ["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] = str(settings.port + 1)  # exclusive
    os.environ.setdefault("RAY_SERVE_PORT_QUARANTINE_S", "0")
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "0")
    port = settings.proxy_port
    if not port:
        with socket.socket() as probe:  # Ray's proxy still runs on the head node: to the side
            probe.bind((settings.host, 0))
            port = probe.getsockname()[1]
    config["http_options"]["port"] = port
    print(
        f"Ingress on {settings.host}:{settings.port} (direct); Ray's proxy on :{port}", flush=True
    )
    return None


def deploy_config(config: dict[str, Any]) -> None:
    """Start Serve (public API) and deploy the config's applications without waiting.

    Ray 2.60 has no public call that deploys a config file in-process: `serve deploy` posts it to
    the dashboard's REST API (which PHOTO3D_DASHBOARD_PORT=0 leaves out), and `serve.run` takes a
    single Application and drops the config's per-deployment settings (the autoscaling policy,
    CPUs per replica). So this is the one place that uses Serve's private client, the same call
    `serve deploy` ends in; check it first on a Ray upgrade."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    serve.start(http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location)
    client = _get_global_client()
    if client is None:  # serve.start just made the controller; this would be a Ray bug
        raise RuntimeError("Ray Serve did not start")
    client.deploy_apps(schema, _blocking=False)


def wait_until_running(deadline: float) -> bool:
    """Wait for every application to be RUNNING; False (after printing why) when one failed or
    the deadline passed."""
    from ray import serve

    while True:
        statuses = serve.status().applications
        states = {name: app.status for name, app in statuses.items()}
        if states and all(str(s).endswith("RUNNING") for s in states.values()):
            return True
        failed = [
            n for n, a in statuses.items() if str(a.status).endswith(("DEPLOY_FAILED", "UNHEALTHY"))
        ]
        if failed or time.monotonic() > deadline:
            for name, app in statuses.items():
                print(f"application {name}: {app.status} {app.message}", file=sys.stderr)
            return False
        time.sleep(0.5)


def ray_temp_dir(run_dir: Path) -> Path:
    """Ray's temp dir: `<run dir>/ray`, unless that path is too long for the Unix sockets Ray
    makes below it (107 bytes, reached by e.g. `session_<date>_<pid>/sockets/dash_MetricsHead`
    when the checkout lives deep in a home folder); then a short one in the system temp dir,
    named after the run dir so each checkout keeps its own."""
    preferred = run_dir / "ray"
    if len(str(preferred)) <= 36:
        return preferred
    digest = hashlib.sha256(str(run_dir).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"photo3d-ray-{digest}"


def wait_for_job_agent(timeout: float) -> bool:
    """Wait until Ray's job server can take a job: it needs the head node's dashboard agent,
    which registers itself some seconds after ray.init on a busy machine, and the job server
    gives up after 10 s ("No available agent to submit job"). Ray has no public readiness call
    for this, so this reads the agent's registration where the job server itself looks."""
    import ray
    from ray._private.ray_constants import KV_NAMESPACE_DASHBOARD
    from ray.dashboard.consts import DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX
    from ray.experimental.internal_kv import _internal_kv_list

    key = (DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX + ray.get_runtime_context().get_node_id()).encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if key in _internal_kv_list(key, namespace=KV_NAMESPACE_DASHBOARD):
            return True
        time.sleep(0.5)
    print("note: Ray's job agent is not up yet; `ray job submit` may ask to retry", file=sys.stderr)
    return False


# --- metrics and monitoring (#13) -------------------------------------------------------------
def _is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1")


def pin_metrics_export(settings: Settings) -> str:
    """Prepare Ray to export metrics on metrics_host:metrics_port; returns the scrape URL.

    Ray binds its metrics endpoint to the node's IP, or to loopback when the node IP is
    loopback (reporter_agent.py). On Linux the node IP is the machine's address unless Ray's
    single-machine mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, what Ray uses on macOS) makes it
    127.0.0.1; `photo3d serve` runs a one-machine cluster (address="local"), so that mode keeps
    the metrics endpoint, and every other Ray port, off the network."""
    if _is_loopback(settings.metrics_host):
        # Read when Ray is imported (ray_constants): set it before, in this process, and every
        # Ray process started from it inherits it.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        if "ray" in sys.modules:
            log.warning(
                "Ray was imported before the metrics port was pinned; it may not bind loopback"
            )
    import socket

    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", settings.metrics_port))
        except OSError:
            raise SystemExit(
                f"port {settings.metrics_port} (Ray's metrics export) is in use: "
                "set PHOTO3D_METRICS_PORT to a free port"
            ) from None
    host = "127.0.0.1" if _is_loopback(settings.metrics_host) else settings.metrics_host
    return f"http://{host}:{settings.metrics_port}/metrics"


def start_monitoring(settings: Settings, run_dir: Path) -> Any:
    """Prometheus against this stack, or a clear note why not (the stack runs on without)."""
    from serve_app.monitoring import MonitoringUnavailable, start_prometheus

    try:
        return start_prometheus(
            run_dir / "prometheus",
            f"127.0.0.1:{settings.metrics_port}",
            port=settings.prometheus_port,
        )
    except MonitoringUnavailable as exc:
        print(f"note: MONITORING=1 but {exc}", file=sys.stderr, flush=True)
        return None


def cmd_serve(args: argparse.Namespace) -> int:
    """Embedded PostgreSQL (if needed) + migrations + local Ray + serve_config.yaml."""
    settings = get_settings()
    metrics_url = pin_metrics_export(settings)  # before anything imports Ray
    run_dir = settings.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    url, _server = database_url_or_embedded(settings)
    from serve_app.store.migrate import migrate

    migrate(url)
    settings = get_settings()
    # Ray workers and Ray Jobs' drivers inherit this environment, and a job runs in its own
    # working directory: give them absolute paths, and this interpreter as `python`.
    os.environ["PHOTO3D_RUN_DIR"] = str(run_dir)
    bin_dir = os.path.dirname(sys.executable)
    os.environ["PATH"] = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])
    if not _artifacts_ready(settings):
        return 2
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback-only local cluster
    config = serve_deploy_config(settings)

    if not args.address:  # read by Ray's replicas, which inherit this environment
        if settings.ingress_mode == "direct":
            refused = use_direct_ingress(config, settings)
            if refused:
                print(f"note: HTTP goes through Ray's proxy: {refused}", flush=True)
        # Replicas run our code on Ray's own event loop instead of a second loop in a thread of
        # its own: every request crossed between the two (GET /task 374 -> 459 req/s at c=32,
        # 2.3 -> 1.9 ms of CPU each; docs/performance.md). Our handlers never block that loop:
        # blocking database calls run in the threadpool (the hottest reads use the async pool),
        # a generation in the worker's own thread.
        os.environ.setdefault("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "0")
        # One machine: the replicas' inter-deployment gRPC ports on loopback, like the rest of
        # the local cluster's ports (Ray opens them on all interfaces; see deployments.py).
        os.environ.setdefault("PHOTO3D_REPLICA_GRPC_HOST", "127.0.0.1")

    import ray
    from ray import serve

    if args.address:
        # Replicas on other nodes inherit their raylet's environment, not ours: pass the
        # service's (non-secret) settings along with the application (a VM cluster).
        forward_settings(config)
        print(
            "note: on a cluster, every node's environment must hold DATABASE_URL, the S3 "
            "credentials and PHOTO3D_URL_SIGNING_KEY (the same key everywhere); "
            "secrets are not sent with the application",
            flush=True,
        )
    if args.address:
        ray.init(
            address=args.address,
            namespace="serve",
            configure_logging=True,
            logging_level=logging.INFO,
        )
    else:
        ray.init(
            # "local": always a new cluster of our own; with no address Ray would join any
            # cluster another `ray start` left on this machine (another checkout's tests, say).
            address="local",
            namespace="serve",
            _temp_dir=str(ray_temp_dir(run_dir)),
            # The dashboard hosts Ray's job server (`ray job submit`, e.g. the bulk conversion
            # job); on loopback only. PHOTO3D_DASHBOARD_PORT=0 leaves it out.
            include_dashboard=settings.dashboard_port > 0,
            dashboard_host="127.0.0.1",
            dashboard_port=settings.dashboard_port or None,
            num_cpus=args.num_cpus,
            configure_logging=True,
            logging_level=logging.INFO,
            _metrics_export_port=settings.metrics_port,
        )
    prometheus = start_monitoring(settings, run_dir) if args.monitoring else None
    stopping = False

    def _stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        print("\nstopping photo3d ...", flush=True)
        if prometheus is not None:
            prometheus.terminate()
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            sys.exit(0)

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    deploy_config(config)
    if not wait_until_running(time.monotonic() + args.wait):
        _stop(0, None)
        return 1
    if settings.dashboard_port and not args.address:  # a cluster has its own job server
        wait_for_job_agent(timeout=30)
        print(
            f"Ray job server (ray job submit --address): http://127.0.0.1:{settings.dashboard_port}",
            flush=True,
        )
    print(
        f"photo3d is running at http://{settings.host}:{settings.port}  (Ctrl-C to stop)",
        flush=True,
    )
    print(f"metrics (Prometheus text, photo3d + Serve + Ray): {metrics_url}", flush=True)
    if prometheus is not None:
        print(f"Prometheus: http://127.0.0.1:{settings.prometheus_port}", flush=True)
    while True:
        time.sleep(3600)


def cmd_generate(args: argparse.Namespace) -> int:
    """Run a backend on photos in this process (no server, no database)."""
    from serve_app import exports
    from serve_app.backends import create_backend
    from serve_app.errors import Photo3DError
    from serve_app.images import ImageLimits, load_image
    from serve_app.service import parse_options

    settings = get_settings()
    raw: dict[str, Any] = {"seed": args.seed, "formats": [args.format]}
    if args.backend:
        raw["backend"] = args.backend
    if args.face_limit:
        raw["face_limit"] = args.face_limit
    if args.texture_size:
        raw["texture_size"] = args.texture_size
    try:
        options = parse_options(raw, settings)
        limits = ImageLimits.from_settings(settings)
        images = [load_image(Path(p).read_bytes(), limits) for p in args.photos]
        backend = create_backend(str(options.backend), settings)
        backend.load()

        def progress(fraction: float, stage: str) -> None:
            if not args.quiet:
                print(f"  {fraction * 100:5.1f}%  {stage}", file=sys.stderr)

        t0 = time.monotonic()
        asset = backend.generate(images, options, progress)
        data = asset.glb if args.format == "glb" else exports.convert(asset.glb, args.format)
    except Photo3DError as exc:
        print(f"error ({exc.code}): {exc.message}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.output or Path(args.photos[0]).with_suffix(f".{args.format}").name)
    out.write_bytes(data)
    if args.debug_dir:
        _write_debug(Path(args.debug_dir), asset, images, options, getattr(backend, "matte", None))
    print(f"wrote {out} ({len(data)} bytes, {time.monotonic() - t0:.2f} s)")
    return 0


def _write_debug(
    folder: Path, asset: Any, images: list[Any], options: Any, matte: Any = None
) -> None:
    """`generate --debug-dir`: the object mask the backend used and, for the cpu backend,
    the segmentation's intermediate images."""
    from serve_app.backends.cpu.backend import debug_images

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if asset.mask_png:
        (folder / "mask.png").write_bytes(asset.mask_png)
        written.append("mask.png")
    if options.backend == "cpu":
        for name, data in debug_images(images[0], options, matte).items():
            if name != "mask.png":
                (folder / name).write_bytes(data)
                written.append(name)
    print(f"debug images in {folder}: {', '.join(written) or 'none'}")


def _accounts() -> Any:
    from serve_app.accounts import Accounts
    from serve_app.store.db import Database
    from serve_app.store.migrate import migrate

    url, server = database_url_or_embedded(get_settings())
    migrate(url)
    db = Database(url)
    db.open(wait=True)
    return Accounts(db), server


def cmd_accounts(args: argparse.Namespace) -> int:
    from serve_app.errors import Photo3DError

    accounts, _server = _accounts()
    try:
        if args.action == "create":
            row = accounts.create_account(args.account, args.name or "", is_admin=args.admin)
            print(f"created account {row['id']}{' (admin)' if row['is_admin'] else ''}")
        else:
            for row in accounts.list_accounts():
                print(f"{row['id']:<24} {'admin' if row['is_admin'] else '':<6} {row['name']}")
    except Photo3DError as exc:
        print(f"error ({exc.code}): {exc.message}", file=sys.stderr)
        return 2
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from serve_app.errors import Photo3DError

    accounts, _server = _accounts()
    try:
        if args.action == "create":
            key, row = accounts.create_key(
                args.account, args.name or "", max_keys=get_settings().max_keys_per_account
            )
            print(
                f"key {row['prefix']} for account {row['account_id']} (shown once, store it now):"
            )
            print(key)
        elif args.action == "revoke":
            row = accounts.revoke_key(args.prefix)
            print(f"revoked key {row['prefix']} of account {row['account_id']}")
        else:
            for row in accounts.list_keys(args.account):
                state = "revoked" if row["revoked_at"] else "active"
                used = (
                    row["last_used_at"].isoformat(timespec="seconds")
                    if row["last_used_at"]
                    else "never"
                )
                print(
                    f"{row['prefix']}  {row['account_id']:<20} {state:<8} "
                    f"last used {used}  {row['name']}"
                )
    except Photo3DError as exc:
        print(f"error ({exc.code}): {exc.message}", file=sys.stderr)
        return 2
    return 0


def _billing() -> Any:
    from serve_app.billing import Billing
    from serve_app.store.db import Database
    from serve_app.store.migrate import migrate

    settings = get_settings()
    url, server = database_url_or_embedded(settings)
    migrate(url)
    db = Database(url)
    db.open(wait=True)
    return Billing(get_settings(), db), server


def cmd_billing(args: argparse.Namespace) -> int:
    """`photo3d billing setup`: the configured products and prices in Stripe, idempotently."""
    from serve_app.billing import Billing, load_config
    from serve_app.errors import Photo3DError

    settings = get_settings()
    try:
        if args.action == "check":
            config = load_config(settings.billing_config)
            print(
                f"billing {'on' if settings.billing_enabled else 'off'}; "
                f"{len(config.packs)} packs, {len(config.plans)} plans, currency {config.currency}"
            )
            return 0
        billing = Billing(settings, db=None)  # type: ignore[arg-type]  # setup needs no database
        for line in billing.setup():
            print(line)
    except Photo3DError as exc:
        print(f"error ({exc.code}): {exc.message}", file=sys.stderr)
        return 2
    return 0


def cmd_credits(args: argparse.Namespace) -> int:
    """Operators: grant credits, or show an account's balance and recent ledger."""
    from serve_app.errors import Photo3DError

    billing, _server = _billing()
    try:
        if args.action == "grant":
            if args.credits is None or not args.reason:
                print("usage: photo3d credits grant ACCOUNT N --reason TEXT", file=sys.stderr)
                return 2
            row = billing.grant(args.account, args.credits, args.reason)
            print(
                f"{row['kind']} {row['amount']:+d} credits to {args.account}; "
                f"balance {row['balance_after']}"
            )
        else:
            account = billing.ledger.account(args.account)
            if account is None:
                print(f"error (account_not_found): account {args.account} not found")
                return 2
            plan = f", plan {account['plan']} ({account['plan_status']})" if account["plan"] else ""
            print(f"{args.account}: balance {account['balance']} credits{plan}")
            for entry in billing.entries(args.account, limit=args.limit):
                when = entry["created_at"].isoformat(timespec="seconds")
                what = entry["reason"] or entry["task_id"] or ""
                print(
                    f"  {when}  {entry['kind']:<10} {entry['amount']:>+8d} "
                    f"-> {entry['balance_after']:>8d}  {what}"
                )
    except Photo3DError as exc:
        print(f"error ({exc.code}): {exc.message}", file=sys.stderr)
        return 2
    finally:
        billing.ledger.db.close()
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    """Fetch (where the internet is reachable) or verify pinned model weights."""
    from serve_app.backends.gpu import weights

    dest = Path(args.dest) if args.dest else get_settings().weights_dir
    try:
        if args.action == "fetch":
            report = weights.fetch(args.model, dest, token=args.token)
        else:
            report = weights.verify(args.model, dest, hashes=not args.no_hashes)
    except weights.WeightsError as exc:
        print(f"error ({exc.code}): {exc.message}", file=sys.stderr)
        return 2
    print(report.describe())
    return 0 if report.ok else 1


# --- API client commands (#15): submit, status, tasks, download, cancel against a server ---------
# Exit codes scripts can rely on.
EXIT_OK = 0
EXIT_TASK_FAILED = 1  # the task ended failed or canceled
EXIT_REFUSED = 2  # the server refused the request (bad photo/option, not found, bad key)
EXIT_UNAVAILABLE = 3  # server unreachable, overloaded (429) or unavailable (503)
EXIT_TIMEOUT = 4  # --wait gave up before the task ended


def _client(args: argparse.Namespace) -> Any:
    from serve_app.client import Client

    return Client(args.server, timeout=args.http_timeout)


def _api_call(func: Any) -> Any:
    """Run an API command, turning client errors into a message and an exit code."""

    def run(args: argparse.Namespace) -> int:
        from serve_app.client import (
            APIError,
            RateLimitError,
            ServiceUnavailableError,
            TaskFailedError,
            WaitTimeout,
        )

        try:
            code: int = func(args)
            return code
        except TaskFailedError as exc:
            print(f"task failed ({exc.code}): {exc.message}", file=sys.stderr)
            return EXIT_TASK_FAILED
        except WaitTimeout as exc:
            print(f"gave up waiting: {exc}", file=sys.stderr)
            return EXIT_TIMEOUT
        except (RateLimitError, ServiceUnavailableError) as exc:
            print(f"error ({exc.code}): {exc.message}", file=sys.stderr)
            return EXIT_UNAVAILABLE
        except APIError as exc:
            print(f"error ({exc.code}): {exc.message}", file=sys.stderr)
            return EXIT_REFUSED
        except (OSError, ValueError) as exc:  # unreadable photo, bad --options JSON
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_REFUSED

    return run


class ProgressBar:
    """Task progress on stderr: a redrawn bar on a terminal, one line per change otherwise."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.last = ""

    def __call__(self, task: dict[str, Any]) -> None:
        if self.quiet:
            return
        fraction = float(task.get("progress") or 0)
        stage = task.get("stage") or task["status"]
        where = task.get("queue_position")
        about = "about " if task.get("queue_position_estimated") else ""
        label = f"queued, {about}{where} ahead" if task["status"] == "queued" and where else stage
        filled = int(fraction * 30)
        line = f"[{'#' * filled}{'.' * (30 - filled)}] {fraction * 100:5.1f}%  {label}"
        if self.tty:
            print(f"\r{line:<72}", end="", file=sys.stderr, flush=True)
        elif label != self.last:
            print(line, file=sys.stderr, flush=True)
        self.last = label

    def done(self) -> None:
        if self.tty and not self.quiet and self.last:
            print(file=sys.stderr)


def _summary(task: dict[str, Any]) -> str:
    parts = [f"{task['id']}  {task['status']}"]
    if task["status"] in ("queued", "running"):
        parts.append(f"{float(task['progress']) * 100:.0f}% {task.get('stage') or ''}".strip())
    if task.get("error"):
        parts.append(f"{task['error']['code']}: {task['error']['message']}")
    if task.get("result"):
        parts.append(  # a format still converting (issue 11) is marked, e.g. "stl (converting)"
            "files: "
            + ", ".join(
                f["format"] + ("" if f.get("ready", True) else " (converting)")
                for f in task["result"]["files"]
            )
        )
    return "  ".join(parts)


def _format_of(args: argparse.Namespace) -> str:
    if args.format:
        return str(args.format)
    if args.output and Path(args.output).suffix:
        return Path(args.output).suffix.lstrip(".").lower()
    return "glb"


@_api_call
def cmd_submit(args: argparse.Namespace) -> int:
    import json

    if bool(args.photos) == bool(args.url):
        raise ValueError("give photo files or --url (one of them)")
    options: dict[str, Any] = json.loads(args.options) if args.options else {}
    if not isinstance(options, dict):
        raise ValueError("--options must be a JSON object")
    for name in ("backend", "seed", "face_limit", "texture_size"):
        value = getattr(args, name)
        if value is not None:
            options[name] = value
    fmt = _format_of(args) if (args.output or args.format) else None
    if fmt and fmt not in ("preview", "turntable"):
        options["formats"] = sorted({"glb", fmt, *options.get("formats", [])})
    with _client(args) as client:
        if args.url:
            task = client.submit(
                image_url=args.url, options=options, idempotency_key=args.idempotency_key
            )
        else:
            task = client.submit(
                list(args.photos), options=options, idempotency_key=args.idempotency_key
            )
        if not (args.wait or args.output):
            print(json.dumps(task, indent=2) if args.json else task["id"])
            return EXIT_OK
        print(f"task {task['id']} queued", file=sys.stderr)
        bar = ProgressBar(args.quiet)
        try:
            task = client.wait(task["id"], timeout=args.timeout, on_update=bar)
        finally:
            bar.done()
        if task["status"] != "succeeded":
            error = task.get("error") or {"code": task["status"], "message": task["status"]}
            print(
                f"task {task['id']} {task['status']} ({error['code']}): {error['message']}",
                file=sys.stderr,
            )
            return EXIT_TASK_FAILED
        if args.output:
            out = client.download(task["id"], fmt or "glb", args.output)
            print(f"wrote {out}", file=sys.stderr)
        print(json.dumps(task, indent=2) if args.json else task["id"])
    return EXIT_OK


@_api_call
def cmd_status(args: argparse.Namespace) -> int:
    import json

    with _client(args) as client:
        task = client.get(args.task_id)
    print(json.dumps(task, indent=2) if args.json else _summary(task))
    return EXIT_OK


@_api_call
def cmd_tasks(args: argparse.Namespace) -> int:
    import json

    with _client(args) as client:
        page = client.list_tasks(status=args.status, limit=args.limit)
    if args.json:
        print(json.dumps(page, indent=2))
    else:
        for task in page["tasks"]:
            print(f"{task['created_at'][:19]}  {_summary(task)}")
    return EXIT_OK


@_api_call
def cmd_download(args: argparse.Namespace) -> int:
    fmt = _format_of(args)
    out = args.output or f"{args.task_id}.{'png' if fmt == 'preview' else fmt}"
    with _client(args) as client:
        path = client.download(args.task_id, fmt, out)
    print(path)
    return EXIT_OK


@_api_call
def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        task = client.cancel(args.task_id)
    print(_summary(task))
    return EXIT_OK


def add_client_commands(sub: Any) -> None:
    """`photo3d submit|status|tasks|download|cancel`: the API client on the command line."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--server",
        default=os.environ.get("PHOTO3D_SERVER"),
        help="API server (default: $PHOTO3D_SERVER or http://127.0.0.1:8000); "
        "the key comes from $PHOTO3D_API_KEY",
    )
    common.add_argument("--http-timeout", type=float, default=60.0, help=argparse.SUPPRESS)
    common.add_argument("--json", action="store_true", help="print the task(s) as JSON")
    formats = [*FORMATS, "preview", "turntable"]

    p = sub.add_parser("submit", parents=[common], help="send photos to a photo3d server")
    p.add_argument("photos", nargs="*", help="photo file(s) of one object (JPEG/PNG/WebP/HEIC)")
    p.add_argument("--url", help="the photo's URL instead of files")
    p.add_argument("--wait", action="store_true", help="wait for the result, showing progress")
    p.add_argument("-o", "--output", help="download the result here (implies --wait)")
    p.add_argument("--format", choices=formats, help="result format (default: from -o, or glb)")
    p.add_argument("--backend")
    p.add_argument("--seed", type=int)
    p.add_argument("--face-limit", type=int)
    p.add_argument("--texture-size", type=int)
    p.add_argument("--options", help="more options as a JSON object")
    p.add_argument("--idempotency-key", help="retrying with the same key returns the same task")
    p.add_argument("--timeout", type=float, help="seconds to wait before giving up (exit 4)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", parents=[common], help="a task's status")
    p.add_argument("task_id")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("tasks", parents=[common], help="your tasks, newest first")
    p.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "canceled"])
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("download", parents=[common], help="download a task's result")
    p.add_argument("task_id")
    p.add_argument("--format", choices=formats, help="default: from -o, or glb")
    p.add_argument("-o", "--output", help="file to write (default: <id>.<format>)")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("cancel", parents=[common], help="cancel a queued or running task")
    p.add_argument("task_id")
    p.set_defaults(func=cmd_cancel)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="photo3d", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the whole stack locally (what `make run` calls)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may use (default: all)")
    p.add_argument("--wait", type=float, default=300, help="seconds to wait for the deploy")
    p.add_argument(
        "--address",
        default=os.environ.get("PHOTO3D_RAY_ADDRESS") or None,
        help="deploy on this running Ray cluster (host:port of its head; default "
        "PHOTO3D_RAY_ADDRESS) instead of starting a local one",
    )
    p.add_argument(
        "--monitoring",
        action="store_true",
        help="also start Prometheus on 127.0.0.1:PHOTO3D_PROMETHEUS_PORT (make run MONITORING=1)",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("migrate", help="apply database migrations")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("accounts", help="create or list accounts")
    p.add_argument("action", choices=["create", "list"])
    p.add_argument("account", nargs="?", help="account id (create)")
    p.add_argument("--name")
    p.add_argument("--admin", action="store_true", help="may use the /api/v1/admin routes")
    p.set_defaults(func=cmd_accounts)

    p = sub.add_parser("keys", help="create, list or revoke API keys")
    p.add_argument("action", choices=["create", "list", "revoke"])
    p.add_argument("--account", help="account id (create; filter for list)")
    p.add_argument("--name", help="a label for the key")
    p.add_argument("prefix", nargs="?", help="key prefix (revoke)")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("billing", help="Stripe products and prices from the billing config")
    p.add_argument("action", choices=["setup", "check"])
    p.set_defaults(func=cmd_billing)

    p = sub.add_parser("credits", help="grant credits or show an account's balance and ledger")
    p.add_argument("action", choices=["grant", "show"])
    p.add_argument("account")
    p.add_argument("credits", nargs="?", type=int, help="grant: credits (negative: adjust down)")
    p.add_argument("--reason", help="grant: why (kept in the ledger)")
    p.add_argument("--limit", type=int, default=20, help="show: ledger entries")
    p.set_defaults(func=cmd_credits)

    p = sub.add_parser(
        "weights", help="fetch or verify model weights (TRELLIS, the cpu backend's U2-Net matte)"
    )
    p.add_argument("action", choices=["fetch", "verify"])
    p.add_argument("model", choices=["trellis", "trellis2", "u2net"])
    p.add_argument("--dest", help="weights folder (default: PHOTO3D_WEIGHTS_DIR or ./weights)")
    p.add_argument("--token", help="Hugging Face token for gated files (else $HF_TOKEN)")
    p.add_argument("--no-hashes", action="store_true", help="verify: skip checksums")
    p.set_defaults(func=cmd_weights)

    p = sub.add_parser("generate", help="turn photos into a 3D model locally, no server")
    p.add_argument("photos", nargs="+", help="photo file(s) of one object")
    p.add_argument("-o", "--output", help="output file (default: <photo>.<format>)")
    p.add_argument("--backend", help="backend name (default: PHOTO3D_DEFAULT_BACKEND or cpu)")
    p.add_argument("--format", default="glb", choices=list(FORMATS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--face-limit", type=int)
    p.add_argument("--texture-size", type=int)
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument(
        "--debug-dir", help="also write the object mask and segmentation intermediates here"
    )
    p.set_defaults(func=cmd_generate)

    add_client_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from serve_app import logs

    args = build_parser().parse_args(argv)
    logs.configure(
        get_settings().log_format, logging.DEBUG if args.verbose else logging.INFO, root=True
    )
    if not args.verbose:
        # Libraries' chatter at INFO: httpx logs every request (a line per poll and download
        # of a client command), pgserver every handle it opens and closes. --verbose shows it.
        for name in ("httpx", "httpcore", "pgserver"):
            logging.getLogger(name).setLevel(logging.WARNING)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
