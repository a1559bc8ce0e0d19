"""The cpu overlay's in-cluster S3 server, run for real: the SeaweedFS StatefulSet's own init
script and `weed server` arguments (from `kubectl kustomize k8s/overlays/cpu`), on loopback with
free ports, then what the bucket Job and photo3d do with it: create the bucket (twice: the Job is
idempotent), write and read an object with the Secret's keys, and be refused with other keys."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def require(ok: bool, reason: str) -> None:
    if ok:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def tool(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    require(found is not None, f"{name} not found (dev extra)")
    assert found is not None
    return found


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def cpu_overlay() -> list[dict[str, Any]]:
    out = subprocess.run(
        [tool("kubectl"), "kustomize", str(ROOT / "k8s" / "overlays" / "cpu")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    weed = tool("weed")
    docs = cpu_overlay()
    sts = next(
        d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "photo3d-s3"
    )
    service = next(
        d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "photo3d-s3"
    )
    pod = sts["spec"]["template"]["spec"]
    init, server = pod["initContainers"][0], pod["containers"][0]
    config_mount = next(m["mountPath"] for m in init["volumeMounts"] if m["name"] == "s3-config")
    data_mount = next(m["mountPath"] for m in server["volumeMounts"] if m["name"] == "data")
    # The Service reaches the port the server listens on.
    s3_port_arg = next(a for a in server["args"] if a.startswith("-s3.port="))
    named = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert int(s3_port_arg.split("=")[1]) == named[service["spec"]["ports"][0]["targetPort"]]

    tmp = tmp_path_factory.mktemp("seaweedfs")
    (tmp / "config").mkdir()
    (tmp / "data").mkdir()
    keys = {"AWS_ACCESS_KEY_ID": "photo3dtestkey", "AWS_SECRET_ACCESS_KEY": os.urandom(16).hex()}
    # The init container, as written, with its volume mapped to a temp folder.
    script = init["command"][2].replace(config_mount, str(tmp / "config"))
    subprocess.run(["sh", "-c", script], env={**os.environ, **keys}, check=True, timeout=30)

    args = [
        a.replace(config_mount, str(tmp / "config")).replace(
            f"-dir={data_mount}", f"-dir={tmp / 'data'}"
        )
        for a in server["args"]
    ]
    ports = free_ports(9)
    # Later flags win: keep every listener on loopback and on free ports (others share this host).
    overrides = [
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={ports[0]}",
        f"-master.port.grpc={ports[1]}",
        f"-volume.port={ports[2]}",
        f"-volume.port.grpc={ports[3]}",
        f"-filer.port={ports[4]}",
        f"-filer.port.grpc={ports[5]}",
        f"-s3.port={ports[6]}",
        f"-s3.port.grpc={ports[7]}",
        f"-metricsPort={ports[8]}",
        f"-filer.localSocket={tmp / 'filer.sock'}",
        f"-s3.localSocket={tmp / 's3.sock'}",
        "-volume.preStopSeconds=0",  # stop at once when the test ends
        # The pod's 50Gi volume keeps its 1% (500 MB) free by default; this temp folder is on the
        # host's shared disk, whose 1% (2.7 GB in CI) once refused every write. A test writes MBs.
        "-volume.minFreeSpace=256MiB",
    ]
    assert args[0] == "server"
    log = (tmp / "weed.log").open("wb")
    proc = subprocess.Popen(
        [weed, *args, *overrides], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    endpoint = f"http://127.0.0.1:{ports[6]}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp / "weed.log").read_text()[-3000:]
            try:
                socket.create_connection(("127.0.0.1", ports[6]), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "SeaweedFS S3 gateway did not start"
                time.sleep(0.5)
        yield {"endpoint": endpoint, "keys": keys, "docs": docs}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def client(endpoint: str, key: str, secret: str) -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        require(False, "boto3 not installed")
        raise
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 10, "mode": "standard"}),
    )


def test_bucket_job_and_artifacts_work_with_the_secret_keys(seaweedfs: dict[str, Any]) -> None:
    from botocore.exceptions import ClientError

    keys = seaweedfs["keys"]
    s3 = client(seaweedfs["endpoint"], keys["AWS_ACCESS_KEY_ID"], keys["AWS_SECRET_ACCESS_KEY"])
    config = next(d for d in seaweedfs["docs"] if d["kind"] == "ConfigMap")["data"]
    bucket, _, prefix = config["PHOTO3D_ARTIFACT_URL"].removeprefix("s3://").partition("/")

    job = next(d for d in seaweedfs["docs"] if d["kind"] == "Job")
    script = job["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    cors = re.search(r"--cors-configuration\s+'([^']+)'", script)
    assert cors, script

    def bucket_job() -> None:
        """What the Job's `head-bucket || create-bucket` then `put-bucket-cors` does."""
        try:
            s3.head_bucket(Bucket=bucket)
        except ClientError:
            s3.create_bucket(Bucket=bucket)
        s3.put_bucket_cors(Bucket=bucket, CORSConfiguration=json.loads(cors[1]))

    deadline = time.monotonic() + 60
    while True:  # the filer may still be starting when the S3 port opens (the Job retries too)
        try:
            bucket_job()
            break
        except ClientError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    bucket_job()  # a second run keeps the bucket
    key = f"{prefix}/smoke/model.glb"
    s3.put_object(Bucket=bucket, Key=key, Body=b"glTF-test")
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == b"glTF-test"

    # A presigned link works from the web page's origin (the viewer fetches it cross-origin).
    link = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key})
    origin = "https://photo3d.example.com"
    answer = httpx.get(link, headers={"Origin": origin})
    assert answer.status_code == 200 and answer.content == b"glTF-test"
    assert answer.headers["access-control-allow-origin"] in {origin, "*"}

    stranger = client(seaweedfs["endpoint"], "someoneelse", "wrong-secret")
    with pytest.raises(ClientError) as refused:
        stranger.get_object(Bucket=bucket, Key=key)
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
