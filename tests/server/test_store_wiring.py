"""Settings → prompt store wiring: `Services.start` opens `Settings.store` with `s3_endpoint_url` and
`s3_region` (server/services.py). Every other server test hands the app a local path or a ready-made
store object, so these run the app in-process (TestClient with lifespan) on an ``s3://`` store URL
against the real moto S3 server (`s3_endpoint`, tests/conftest.py) and look at the bucket with boto3.

The standard AWS variables are set to the *opposite* of what the settings say (endpoint and region),
so a server that dropped either setting would fall back to them and fail these tests: the good
endpoint's test would talk to a dead port, the dead endpoint's test would reach the live server.
Credentials come from the AWS variables (the settings have no credential fields, by design).
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from fastapi.testclient import TestClient

from prompt_store.s3 import S3Store
from server.app import create_app
from server.settings import Settings
from tests.server.helpers import BACKBONE_SPEC, artifact_bytes, png_bytes
from tests.server.server_proc import free_port
from tests.server.test_api import expected_probs
from vpt.hub import Backbone, load_backbone

REGION = "eu-west-1"  # what the settings say
ENV_REGION = "us-west-2"  # what boto3 would use without it
KEYS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
TENANT = "default"  # open mode: every caller is the default tenant
OCTET = {"content-type": "application/octet-stream"}
PNG = {"content-type": "image/png"}


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return load_backbone(BACKBONE_SPEC)


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """A clean AWS environment: test credentials, no profile or shared config, region ENV_REGION."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEYS["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", KEYS["aws_secret_access_key"])
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_DEFAULT_REGION", ENV_REGION)
    return monkeypatch


def s3(endpoint: str) -> Any:
    """A plain boto3 client on the moto server, configured explicitly (not from the environment)."""
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **KEYS)


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    name = f"vpt-wiring-{uuid.uuid4().hex[:12]}"
    s3(s3_endpoint).create_bucket(Bucket=name)
    return name


def dead_endpoint() -> str:
    """A loopback URL nobody listens on (connection refused)."""
    return f"http://127.0.0.1:{free_port()}"


def app_settings(**kw: Any) -> Settings:
    base: dict[str, Any] = dict(
        backbone=BACKBONE_SPEC, access_log=False, open_mode=True, max_prompt_length=16, max_classes=20
    )
    return Settings(**{**base, **kw})


def keys_in(endpoint: str, bucket: str) -> set[str]:
    listing = s3(endpoint).list_objects_v2(Bucket=bucket)
    return {obj["Key"] for obj in listing.get("Contents", [])}


def top1(backbone: Backbone, art: bytes, image: bytes) -> int:
    """The reference class for `image` under the task in `art`."""
    return int(expected_probs(backbone, art, image).argmax())


@pytest.fixture
def client_for() -> Iterator[Callable[[Settings], TestClient]]:
    """Starts the app in-process with its lifespan (Services.start opens the store from the settings)."""
    with contextlib.ExitStack() as stack:
        yield lambda settings: stack.enter_context(TestClient(create_app(settings)))


def test_s3_settings_reach_the_store(
    s3_endpoint: str, bucket: str, aws_env: pytest.MonkeyPatch, backbone: Backbone, client_for: Any
) -> None:
    prefix = "serve/prod"
    task_dir = f"{prefix}/tenants/{TENANT}/tasks"
    # A task already in the bucket (written by another server, say), through the store library.
    seeded = artifact_bytes(backbone, P=3, mode="deep", C=4, seed=7)
    writer = S3Store(bucket, prefix, endpoint_url=s3_endpoint, region="us-east-1")
    assert writer.put(TENANT, "seeded", seeded).version == 1
    writer.close()
    before = keys_in(s3_endpoint, bucket)
    assert before == {f"{task_dir}/seeded/manifest.json", f"{task_dir}/seeded/v000001.safetensors"}

    # The settings as deployments give them: VPT_* variables. boto3's own variable points elsewhere.
    aws_env.setenv("VPT_STORE", f"s3://{bucket}/{prefix}")
    aws_env.setenv("VPT_S3_ENDPOINT_URL", s3_endpoint)
    aws_env.setenv("VPT_S3_REGION", REGION)
    aws_env.setenv("AWS_ENDPOINT_URL", dead_endpoint())
    settings = app_settings()
    assert (settings.store, settings.s3_endpoint_url, settings.s3_region) == (
        f"s3://{bucket}/{prefix}",
        s3_endpoint,
        REGION,
    )
    client = client_for(settings)

    store = client.app.state.services.store
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix, store.endpoint_url) == (bucket, prefix, s3_endpoint)
    # moto accepts any signing region, so the region is checked on the client the store signs with.
    assert store._client.meta.region_name == REGION
    assert client.get("/readyz").status_code == 200

    # Reads come from the bucket: the seeded task is listed and classifies.
    r = client.get("/v1/tasks")
    assert r.status_code == 200, r.text
    assert [t["task_id"] for t in r.json()["tasks"]] == ["seeded"]
    image = png_bytes(3)
    r = client.post("/v1/tasks/seeded/classify", content=image, headers=PNG)
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 1
    assert r.json()["predictions"][0][0]["index"] == top1(backbone, seeded, image)

    # Writes land in the bucket, under the prefix, in the documented layout (docs/store.md).
    data = artifact_bytes(backbone, P=5, mode="deep", C=6, seed=1)
    r = client.put("/v1/tasks/birds", content=data, headers=OCTET)
    assert r.status_code == 201, r.text
    assert r.json()["version"] == 1
    assert keys_in(s3_endpoint, bucket) - before == {
        f"{task_dir}/birds/manifest.json",
        f"{task_dir}/birds/v000001.safetensors",
    }
    raw = s3(s3_endpoint)
    body = raw.get_object(Bucket=bucket, Key=f"{task_dir}/birds/v000001.safetensors")["Body"].read()
    assert body == data
    manifest = json.loads(raw.get_object(Bucket=bucket, Key=f"{task_dir}/birds/manifest.json")["Body"].read())
    assert manifest["current"] == 1

    for seed in range(3):
        image = png_bytes(10 + seed)
        r = client.post("/v1/tasks/birds/classify", content=image, headers=PNG)
        assert r.status_code == 200, r.text
        assert r.json()["task_id"] == "birds" and r.json()["version"] == 1
        assert r.json()["predictions"][0][0]["index"] == top1(backbone, data, image)


def test_wrong_s3_endpoint_makes_the_store_unavailable(
    s3_endpoint: str, bucket: str, aws_env: pytest.MonkeyPatch, backbone: Backbone, client_for: Any
) -> None:
    """docs/api.md: an unreachable store answers 503 `store_unavailable`; readiness (warm-up and
    draining only) stays 200, so resident tasks keep serving. boto3's variable names the live server:
    only a server that ignored `s3_endpoint_url` would reach it."""
    aws_env.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    dead = dead_endpoint()
    client = client_for(app_settings(store=f"s3://{bucket}/serve", s3_endpoint_url=dead, s3_region=REGION))
    assert client.app.state.services.store.endpoint_url == dead
    assert client.get("/readyz").status_code == 200

    data = artifact_bytes(backbone, P=2, mode="shallow", C=3, seed=2)
    for resp in (
        client.put("/v1/tasks/birds", content=data, headers=OCTET),
        client.get("/v1/tasks"),
        client.get("/v1/tasks/birds"),
        client.post("/v1/tasks/birds/classify", content=png_bytes(0), headers=PNG),
    ):
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"]["type"] == "store_unavailable", resp.text
    assert keys_in(s3_endpoint, bucket) == set()  # nothing reached the live server
