"""The deploy config and the launcher's choices of what to deploy."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve_app.autoscaling import QueueBacklogPolicy, desired_replicas
from serve_app.cli import select_backends
from serve_app.deployments import AppArgs
from serve_app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def config() -> dict:
    return yaml.safe_load((ROOT / "serve_config.yaml").read_text())


def test_serve_config_is_a_valid_deploy_schema_with_typed_args() -> None:
    schema = ServeDeploySchema.model_validate(config())
    app = schema.applications[0]
    args = AppArgs.model_validate(app.args)
    names = {d["name"] for d in app.model_dump()["deployments"]}
    assert names == {"Ingress", "QueueMonitor"} | {f"generator-{b}" for b in args.backends}


def test_every_generator_scales_on_the_queue_backlog() -> None:
    for deployment in config()["applications"][0]["deployments"]:
        if deployment["name"].startswith("generator-"):
            policy = deployment["autoscaling_config"]["policy"]
            assert policy["policy_function"] == "serve_app.autoscaling:QueueBacklogPolicy"
            assert policy["policy_kwargs"]["backend"] == deployment["name"].removeprefix(
                "generator-"
            )
            QueueBacklogPolicy(**policy["policy_kwargs"])  # the kwargs are accepted


def test_without_gpu_the_launcher_leaves_gpu_backends_out() -> None:
    chosen = select_backends(config(), None, has_gpu=False)["applications"][0]
    assert chosen["args"]["backends"] == ["cpu"]
    assert {d["name"] for d in chosen["deployments"]} == {
        "Ingress",
        "QueueMonitor",
        "generator-cpu",
    }
    ServeDeploySchema.model_validate(select_backends(config(), None, has_gpu=False))
    with_gpu = select_backends(config(), None, has_gpu=True)["applications"][0]
    assert with_gpu["args"]["backends"] == ["cpu", "trellis", "trellis2"]


def test_photo3d_backends_picks_and_refuses_unknown() -> None:
    chosen = select_backends(config(), ["trellis"], has_gpu=False)["applications"][0]
    assert chosen["args"]["backends"] == ["trellis"]
    with pytest.raises(SystemExit):
        select_backends(config(), ["nope"], has_gpu=True)


@pytest.mark.parametrize(
    ("queued", "running", "per", "lo", "hi", "want"),
    [
        (0, 0, 1, 0, 4, 0),
        (1, 0, 1, 0, 4, 1),
        (3, 2, 2, 0, 4, 3),
        (100, 0, 1, 0, 4, 4),
        (0, 0, 1, 1, 4, 1),
    ],
)
def test_desired_replicas_follow_the_backlog(
    queued: int, running: int, per: float, lo: int, hi: int, want: int
) -> None:
    assert desired_replicas(queued, running, per, lo, hi) == want


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://db/x")
    monkeypatch.setenv("PHOTO3D_MAX_ATTEMPTS", "5")
    monkeypatch.setenv("PHOTO3D_EXTRA_BACKENDS", "a=m:A, b=n:B")
    settings = Settings()
    assert settings.database_url == "postgresql://db/x"
    assert settings.max_attempts == 5
    assert settings.host == "127.0.0.1"  # local default binds loopback only
    assert settings.extra_backend_map == {"a": "m:A", "b": "n:B"}


def test_queries_with_optional_filters_are_planned_per_call() -> None:
    """A generic plan cannot see which optional filter is off (the deep-cursor listing became a
    405k-row filter), so those queries run unprepared; the rest keep their prepared plans
    (planning the task read on every GET cost PostgreSQL 0.5 ms of CPU, issue 11)."""
    from serve_app.store.db import planned_per_call, prepare

    assert {"list_tasks", "list_batches", "list_ledger", "list_api_keys"} <= planned_per_call()
    assert prepare("list_tasks") is False
    for hot in ("get_task", "claim_task", "insert_task", "authenticate_key", "count_request"):
        assert hot not in planned_per_call() and prepare(hot) is None
