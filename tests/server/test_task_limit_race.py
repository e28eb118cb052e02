"""A tenant's `max_tasks` holds under concurrent uploads, against real `vpt-serve` processes on 127.0.0.1.

Two servers share one store (a local directory: two API-server processes on one host; a moto S3
bucket: two replicas). Each round starts with the tenant at LIMIT - 2 tasks and sends RACERS uploads of
new tasks at once (all to one server, or split over both) plus one upload of a new version of a live
task: exactly 2 creates answer 201, the others 403 `quota_exceeded`, the new version 200, and both
servers then list exactly LIMIT tasks. The two created tasks are deleted before the next round.

Before the fix the route counted the tenant's tasks and then stored, as two steps: several uploads
counted LIMIT - 2 before any of them committed, and all were accepted.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from tests.server.helpers import BACKBONE_SPEC, artifact_bytes, write_tenants
from tests.server.server_proc import ServerProcess
from vpt.hub import Backbone, load_backbone

pytestmark = pytest.mark.integration

TENANT = "acme"
KEY = "vpt_test_key_acme_limit"
LIMIT = 6
RACERS = 8
ROUNDS = 3
AUTH = {"authorization": f"Bearer {KEY}"}
OCTET = {**AUTH, "content-type": "application/octet-stream"}


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return load_backbone(BACKBONE_SPEC)


def start_pair(tmp: Path, **settings: object) -> list[ServerProcess]:
    """Two servers on the same store, tenant `acme` limited to LIMIT tasks."""
    tenants = write_tenants(tmp, {TENANT: KEY}, {TENANT: {"max_tasks": LIMIT}})
    common = dict(backbone=BACKBONE_SPEC, open_mode="false", tenants_file=tenants, access_log="false")
    servers = [ServerProcess(tmp, **{**common, **settings}) for _ in range(2)]
    try:
        return [s.wait_ready() for s in servers]
    except BaseException:
        for s in servers:
            s.stop()
        raise


def upload_race(urls: list[str], uploads: list[tuple[str, bytes]]) -> dict[str, tuple[int, str | None]]:
    """PUT every (task_id, bytes) at once, upload i to `urls[i % len(urls)]`, each from its own
    connection (opened beforehand); returns task id -> (status, error type)."""
    clients = [httpx.Client(base_url=urls[i % len(urls)], timeout=60) for i in range(len(uploads))]
    for c in clients:
        assert c.get("/healthz").status_code == 200  # connect now, not at the start line
    barrier = threading.Barrier(len(uploads))
    out: dict[str, tuple[int, str | None]] = {}

    def send(i: int) -> None:
        task_id, data = uploads[i]
        barrier.wait()
        r = clients[i].put(f"/v1/tasks/{task_id}", content=data, headers=OCTET)
        error = r.json().get("error", {}).get("type") if r.status_code >= 400 else None
        out[task_id] = (r.status_code, error)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(uploads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in clients:
        c.close()
    return out


def listed(url: str) -> set[str]:
    r = httpx.get(f"{url}/v1/tasks", params={"limit": 1000}, headers=AUTH)
    assert r.status_code == 200, r.text
    return {t["task_id"] for t in r.json()["tasks"]}


def run_rounds(servers: list[ServerProcess], backbone: Backbone) -> None:
    a, b = servers
    for i in range(LIMIT - 2):
        data = artifact_bytes(backbone, P=2, mode="shallow", C=3, seed=i)
        r = httpx.put(f"{a.url}/v1/tasks/old-{i}", content=data, headers=OCTET, timeout=60)
        assert r.status_code == 201, r.text
    targets = [[a.url], [a.url, b.url], [b.url]]  # within one server, across both, the other one
    for round_ in range(ROUNDS):
        new_ids = [f"r{round_}-new-{i}" for i in range(RACERS)]
        uploads = [
            (task_id, artifact_bytes(backbone, P=2, mode="shallow", C=3, seed=100 * (round_ + 1) + i))
            for i, task_id in enumerate(new_ids)
        ]
        uploads.append(("old-0", artifact_bytes(backbone, P=2, mode="shallow", C=3, seed=90 + round_)))
        out = upload_race(targets[round_ % len(targets)], uploads)
        assert out["old-0"] == (200, None), out  # a new version never counts against the limit
        created = [t for t in new_ids if out[t] == (201, None)]
        refused = [t for t in new_ids if out[t] == (403, "quota_exceeded")]
        assert len(created) == 2 and len(refused) == RACERS - 2, f"round {round_}: {out}"
        for server in servers:
            names = listed(server.url)
            assert len(names) == LIMIT and names & set(new_ids) == set(created), (round_, sorted(names))
        for task_id in created:
            r = httpx.delete(f"{a.url}/v1/tasks/{task_id}", headers=AUTH)
            assert r.status_code == 204, r.text


def stop_all(servers: list[ServerProcess]) -> None:
    codes = [s.stop() for s in servers]
    assert codes == [0, 0], "\n".join(s.log()[-3000:] for s in servers)


def test_max_tasks_holds_across_two_servers_on_one_directory(tmp_path: Path, backbone: Backbone) -> None:
    servers = start_pair(tmp_path, store=str(tmp_path / "store"))
    try:
        run_rounds(servers, backbone)
    finally:
        stop_all(servers)


@pytest.fixture
def s3_bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    """A fresh bucket on the moto server; the AWS credentials the servers inherit."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    bucket = f"vpt-limit-{uuid.uuid4().hex[:12]}"
    client: Any = boto3.client(
        "s3", endpoint_url=s3_endpoint, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )  # fmt: skip
    client.create_bucket(Bucket=bucket)
    yield bucket


@pytest.mark.slow
def test_max_tasks_holds_across_two_replicas_on_one_bucket(
    tmp_path: Path, backbone: Backbone, s3_endpoint: str, s3_bucket: str
) -> None:
    servers = start_pair(
        tmp_path, store=f"s3://{s3_bucket}/serve", s3_endpoint_url=s3_endpoint, s3_region="us-east-1"
    )
    try:
        run_rounds(servers, backbone)
    finally:
        stop_all(servers)
