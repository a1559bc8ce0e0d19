"""The one typed settings object. Every knob comes from the environment (prefix PHOTO3D_)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Settings read from `PHOTO3D_*` environment variables (and `DATABASE_URL`)."""

    model_config = SettingsConfigDict(env_prefix="PHOTO3D_", extra="ignore", frozen=True)

    environment: Literal["development", "production"] = "development"

    # --- database -------------------------------------------------------------
    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("DATABASE_URL", "PHOTO3D_DATABASE_URL")
    )
    db_pool_min: int = Field(default=1, ge=1)
    db_pool_max: int = Field(default=8, ge=1)
    db_connect_timeout_s: float = Field(default=5.0, gt=0)

    # --- local run --------------------------------------------------------------
    run_dir: Path = Path(".run")
    artifact_dir: Path | None = None  # default: <run_dir>/artifacts
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    # How HTTP reaches the Ingress under `photo3d serve` on one machine. "direct": the Ingress
    # replica itself listens on `port` (Ray Serve's direct ingress; one Ingress replica, no proxy
    # hop: ~3x the GET rate on 2 cores, docs/performance.md). "proxy": through Ray Serve's HTTP
    # proxy, which can spread requests over several Ingress replicas. A Ray cluster joined with
    # --address, and Kubernetes, always use the proxy.
    ingress_mode: Literal["direct", "proxy"] = "direct"
    proxy_port: int = Field(default=0, ge=0, le=65535)  # Ray's proxy in direct mode; 0 = any free
    dashboard_port: int = Field(default=8265, ge=0, le=65535)  # Ray's job server; 0 = off
    serve_config: Path = Path("serve_config.yaml")

    # --- access -------------------------------------------------------------------
    # Unset: required in production, optional in development (single-user "local" account).
    auth_required: bool | None = Field(
        default=None, validation_alias=AliasChoices("AUTH_REQUIRED", "PHOTO3D_AUTH_REQUIRED")
    )
    rate_limit_requests: int = Field(default=120, ge=1, description="requests per key per window")
    rate_limit_window_seconds: int = Field(default=60, ge=1)
    max_active_tasks: int = Field(default=20, ge=1, description="queued+running per account")
    max_batch_in_flight: int = Field(
        default=16, ge=1, description="a bulk job's queued+running items (not max_active_tasks)"
    )
    cors_origins: str = ""  # comma separated; empty = no cross-origin access
    request_timeout_seconds: float = Field(default=60.0, gt=0)
    result_retention_seconds: float = Field(default=7 * 24 * 3600, ge=0)  # 0 = keep forever
    url_fetch_timeout_seconds: float = Field(default=10.0, gt=0)
    url_max_redirects: int = Field(default=3, ge=0, le=10)
    # host:port pairs image_url may reach even on private addresses (internal buckets); a bare
    # host allows only ports 80 and 443.
    url_allow_hosts: str = ""

    # --- tenant fairness and abuse limits (issue 10) --------------------------------------
    rate_limit_account_requests: int = Field(
        default=300, ge=1, description="requests per account (all its keys) per window"
    )
    max_keys_per_account: int = Field(default=20, ge=1, description="active API keys per account")
    # Failed authentications per client address per window, before 429 without a lookup.
    auth_failures_per_address: int = Field(default=20, ge=1)
    # Behind a reverse proxy every request comes from the proxy's address: name the header it
    # appends the client's address to (e.g. X-Forwarded-For; its last entry is used).
    client_address_header: str = ""
    max_streams_per_account: int = Field(
        default=4, ge=1, description="open SSE streams per replica"
    )
    max_uploads_per_account: int = Field(
        default=4, ge=1, description="request bodies and image_url fetches in flight per replica"
    )
    # A request body must arrive whole within body_timeout_seconds, and after a grace period at
    # body_min_rate_bytes_per_s or faster: a client trickling bytes cannot hold a slot for long.
    body_timeout_seconds: float = Field(default=60.0, gt=0)
    body_min_rate_bytes_per_s: int = Field(default=16 * 1024, ge=0)
    body_grace_seconds: float = Field(default=5.0, ge=0)

    # --- input limits -------------------------------------------------------------
    max_upload_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(default=40_000_000, ge=64)
    max_image_side: int = Field(default=8192, ge=16)
    min_image_side: int = Field(default=16, ge=1)
    max_images_per_task: int = Field(default=8, ge=1)

    # --- queue ----------------------------------------------------------------------
    default_backend: str = "cpu"
    lease_seconds: float = Field(default=60.0, gt=0)
    heartbeat_seconds: float = Field(default=10.0, gt=0)
    poll_seconds: float = Field(default=5.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    retry_backoff_seconds: float = Field(default=5.0, ge=0)
    task_timeout_seconds: float = Field(default=900.0, gt=0)
    worker_alive_seconds: float = Field(default=30.0, gt=0)
    health_requires_worker: bool = True

    # --- backends -------------------------------------------------------------------
    # Extra backends as name=module:attr pairs, comma separated (plugins, test fakes).
    extra_backends: str = ""
    weights_dir: Path = Path("weights")
    trellis_model_dir: Path | None = None  # default: <weights_dir>/TRELLIS-image-large
    trellis2_model_dir: Path | None = None  # default: <weights_dir>/TRELLIS.2-4B
    torch_home: Path | None = None  # default: <weights_dir>/torch (DINOv2 hub code + checkpoint)
    u2net_home: Path | None = None  # default: <weights_dir>/u2net (rembg u2net.onnx)
    dinov3_model_dir: Path | None = None  # default: <weights_dir>/dinov3-vitl16-pretrain-lvd1689m
    trellis2_rembg_dir: Path | None = None  # default: <weights_dir>/BiRefNet
    # The CPU backend's segmentation of photos without transparency: "colour" (no weights, the
    # default) or "u2net", rembg's U2-Net read from <u2net_home>/u2net.onnx (never downloaded;
    # needs the `matte` extra). docs/cpu-backend.md.
    cpu_matte: Literal["colour", "u2net"] = "colour"
    trellis2_low_vram: bool = True  # upstream default; False is faster on big dedicated GPUs
    gpu_warmup: bool = True

    # --- artifacts and downloads (issue #14) ------------------------------------------
    # s3://bucket/prefix puts every artifact in an S3-compatible bucket (endpoint and credentials
    # from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION); unset: the
    # local artifact_dir.
    artifact_url: str | None = None
    # The S3 endpoint browsers reach, when the service's own (AWS_ENDPOINT_URL) is internal.
    s3_public_endpoint: str | None = None
    download_url_ttl_seconds: int = Field(default=900, ge=10, le=7 * 24 * 3600)
    # HMAC key of signed download links. Unset: `photo3d serve` keeps one in the run folder.
    url_signing_key: SecretStr | None = None

    # --- observability (metrics, logs) -----------------------------------------------------
    # `photo3d serve` pins Ray's metrics export (Prometheus text) to metrics_host:metrics_port.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=8080, ge=1, le=65535)
    queue_metrics_seconds: float = Field(default=5.0, gt=0, description="queue gauge refresh")
    log_format: Literal["json", "text"] = "json"
    prometheus_port: int = Field(default=9090, ge=1, le=65535)  # `make run MONITORING=1`

    # --- billing (Stripe) -----------------------------------------------------------
    # Off unless PHOTO3D_BILLING=true or STRIPE_SECRET_KEY is set: then every generation is
    # priced in credits. The Stripe settings carry Stripe's own names (no PHOTO3D_ prefix).
    billing: bool | None = None
    signup_credits: int = Field(default=0, ge=0, description="granted once per account")
    billing_config: Path | None = None  # prices, packs, plans; default: the packaged billing.yaml
    # Where Checkout and the portal send people back (the web page); unset: the address the
    # request came to (set it behind a proxy that rewrites the host).
    billing_return_url: str | None = None
    meter_poll_seconds: float = Field(default=10.0, gt=0)
    stripe_secret_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("STRIPE_SECRET_KEY", "stripe_secret_key")
    )
    stripe_webhook_secret: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("STRIPE_WEBHOOK_SECRET", "stripe_webhook_secret"),
    )
    # A local stand-in server for tests and demos (e.g. localstripe); unset = api.stripe.com.
    stripe_api_base: str | None = Field(
        default=None, validation_alias=AliasChoices("STRIPE_API_BASE", "stripe_api_base")
    )

    @property
    def billing_enabled(self) -> bool:
        return self.billing if self.billing is not None else self.stripe_secret_key is not None

    # --- webhooks (#15) ------------------------------------------------------------------
    # Each ingress replica runs a delivery loop (off = deliver from elsewhere, or not at all).
    webhook_dispatcher: bool = True
    webhook_timeout_seconds: float = Field(default=10.0, gt=0)
    webhook_max_response_bytes: int = Field(default=64 * 1024, ge=0)  # read, then hang up
    webhook_concurrency: int = Field(default=8, ge=1, le=64)  # deliveries at once per replica
    webhook_endpoint_concurrency: int = Field(default=2, ge=1)  # in flight per endpoint
    webhook_poll_seconds: float = Field(default=1.0, gt=0)
    webhook_retry_base_seconds: float = Field(default=5.0, ge=0)  # first retry; x4 each time
    webhook_retry_max_seconds: float = Field(default=5 * 3600, gt=0)
    webhook_retry_window_seconds: float = Field(default=24 * 3600, gt=0)  # then give up
    webhook_retention_seconds: float = Field(default=7 * 24 * 3600, gt=0)  # delivery log
    webhook_max_endpoints: int = Field(default=10, ge=1)  # per account
    webhook_secret_grace_seconds: float = Field(default=24 * 3600, ge=0)  # old secret after rotate

    # --- issue 11: the files that follow a task's success (the preview, formats besides GLB) --
    # "eager": each generator makes them right after `succeeded`, on a low-priority thread of its
    # own; "on_request": only when first fetched (a CPU-bound machine keeps its cores for
    # generation: the CPU backend's preview costs about as much CPU as its generation).
    after_success_files: Literal["eager", "on_request"] = "eager"

    @field_validator("database_url", "artifact_url", "s3_public_endpoint")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        return value or None

    @property
    def auth_enforced(self) -> bool:
        return (
            self.auth_required
            if self.auth_required is not None
            else (self.environment == "production")
        )

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    @property
    def url_allow_host_set(self) -> set[str]:
        """The `host:port` pairs image_url may reach on private addresses."""
        from serve_app.fetch import parse_allow_list

        return parse_allow_list(self.url_allow_hosts)

    @property
    def artifacts_path(self) -> Path:
        return self.artifact_dir or self.run_dir / "artifacts"

    @property
    def extra_backend_map(self) -> dict[str, str]:
        pairs = (p.strip() for p in self.extra_backends.split(",") if p.strip())
        return dict(p.split("=", 1) for p in pairs if "=" in p)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings of this process, read once."""
    return Settings()
