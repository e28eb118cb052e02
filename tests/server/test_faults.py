"""Faults (issue D, point 8), with real components wherever possible:

- the store goes away (a real S3-protocol server on 127.0.0.1 is stopped; a local store's directory is
  replaced or removed): resident tasks keep serving, uploads and cold tasks answer 503;
- the engine fails one batch (`VPT_FAULT_FAIL_EVERY`): only that batch's requests get 503, the next
  batch runs;
- the engine runs out of memory on large batches (`VPT_FAULT_OOM_OVER`): batches are split and succeed;
- a stored version is corrupted on disk: only that task fails, with 503 corrupt_artifact, not a 500.

In process: TestClient (with lifespan) for sequential scenarios; httpx over ASGI inside the app's own
lifespan for concurrent ones, so requests really share batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
import uuid
from pathlib import Path

import boto3
import httpx
import pytest
from fastapi.testclient import TestClient

from prompt_store.s3 import S3Store
from server.app import create_app
from server.settings import Settings
from tests.moto_s3 import moto_server
from tests.server.helpers import BACKBONE_SPEC, artifact_bytes, png_bytes
from vpt.hub import load_backbone

OCTET = {"content-type": "application/octet-stream"}
PNG = {"content-type": "image/png"}
CREDS = {"region": "us-east-1", "access_key_id": "testing", "secret_access_key": "testing"}


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(BACKBONE_SPEC)


def settings(tmp: Path, **kw) -> Settings:
    base = dict(
        backbone=BACKBONE_SPEC,
        store=str(tmp / "store"),
        access_log=False,
        open_mode=True,
        version_ttl_s=0.1,  # re-check the store often, so a dead store is noticed within the test
        request_timeout_s=10.0,
    )
    return Settings(**{**base, **kw})


def put(client, task: str, data: bytes):
    return client.put(f"/v1/tasks/{task}", content=data, headers=OCTET)


def classify(client, task: str, seed: int = 0):
    return client.post(f"/v1/tasks/{task}/classify", content=png_bytes(seed), headers=PNG)


def assert_error(resp, status: int, type_: str, *words: str) -> None:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["type"] == type_, err
    for w in words:
        assert w in err["message"], err["message"]


def assert_store_unavailable(client, backbone) -> None:
    """With the store gone, what needs it answers 503 `store_unavailable`: uploads (to a stored task
    and a new one), the listing (not an empty one), a task's info and a never-stored task (not 404)."""
    data = artifact_bytes(backbone, P=2, mode="deep", C=3, seed=3)
    for resp in (
        put(client, "hot", data),
        put(client, "new", data),
        client.get("/v1/tasks"),
        client.get("/v1/tasks/hot"),
        classify(client, "never-stored"),
    ):
        assert_error(resp, 503, "store_unavailable")


def keeps_serving(client, task: str, seconds: float) -> list[int]:
    """Classify `task` repeatedly for `seconds` (several version-TTL periods); the statuses seen."""
    statuses, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        statuses.append(classify(client, task, len(statuses)).status_code)
        time.sleep(0.02)
    return statuses


# --------------------------------------------------------------------------------- store unavailable


def test_s3_store_stopped_resident_tasks_keep_serving_uploads_503(tmp_path, backbone):
    with moto_server(tmp_path / "moto.log") as (proc, endpoint):
        bucket = f"vpt-{uuid.uuid4().hex[:12]}"
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=CREDS["region"],
            aws_access_key_id=CREDS["access_key_id"],
            aws_secret_access_key=CREDS["secret_access_key"],
        ).create_bucket(Bucket=bucket)
        store = S3Store(bucket, "store", endpoint_url=endpoint, connect_timeout=0.5, max_attempts=2, **CREDS)
        with TestClient(create_app(settings(tmp_path), store=store)) as client:
            assert (
                put(client, "hot", artifact_bytes(backbone, P=2, mode="deep", C=3, seed=1)).status_code == 201
            )
            assert (
                put(client, "cold", artifact_bytes(backbone, P=1, mode="shallow", C=2, seed=2)).status_code
                == 201
            )
            assert classify(client, "hot").status_code == 200  # now resident in the bank

            proc.terminate()  # the store is gone: connection refused from now on
            proc.wait(10)

            statuses = keeps_serving(client, "hot", 1.0)  # ~10 version checks fail meanwhile
            assert statuses and set(statuses) == {200}, statuses
            assert_store_unavailable(client, backbone)
            assert_error(classify(client, "cold"), 503, "store_unavailable")  # never loaded: needs the store
            r = put(client, "new", artifact_bytes(backbone, P=2, mode="deep", C=3, seed=3))
            assert r.headers.get("retry-after") is None or int(r.headers["retry-after"]) >= 1
            assert client.get("/readyz").status_code == 200
            assert classify(client, "hot").status_code == 200


def _break_local_store(root: Path, how: str) -> None:
    gone = root.with_name(root.name + ".gone")
    root.rename(gone)
    if how == "replaced-by-file":  # e.g. a mount point whose volume went away under a file
        root.write_bytes(b"not a directory")


@pytest.mark.parametrize("how", ["replaced-by-file", "removed"])
def test_local_store_gone_resident_tasks_keep_serving_uploads_503(tmp_path, backbone, how):
    with TestClient(create_app(settings(tmp_path))) as client:
        assert put(client, "hot", artifact_bytes(backbone, P=2, mode="deep", C=3, seed=1)).status_code == 201
        assert classify(client, "hot").status_code == 200

        _break_local_store(tmp_path / "store", how)

        statuses = keeps_serving(client, "hot", 0.6)
        assert set(statuses) == {200}, statuses
        assert_store_unavailable(client, backbone)
        if how == "removed":
            assert not (tmp_path / "store").exists()  # nothing recreated the store's tree
        assert classify(client, "hot").status_code == 200


# ------------------------------------------------------------------------------------- engine faults


@contextlib.asynccontextmanager
async def running(app):
    """The app's lifespan plus an async client over ASGI: concurrent requests in one event loop."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://vpt", timeout=30) as c:
            yield c


async def burst(c: httpx.AsyncClient, task: str, n: int, images: int = 1) -> list[httpx.Response]:
    async def one(i: int) -> httpx.Response:
        files = [("images", (f"{j}.png", png_bytes(i * 10 + j))) for j in range(images)]
        return await c.post(f"/v1/tasks/{task}/classify", files=files)

    return await asyncio.gather(*(one(i) for i in range(n)))


def test_engine_failure_fails_only_that_batch(tmp_path, backbone):
    # Batches of exactly 4: the 12 requests of one burst arrive well within the 300 ms batching delay.
    app = create_app(settings(tmp_path, fault_fail_every=2, max_batch_size=4, max_batch_delay_ms=300))
    data = artifact_bytes(backbone, P=2, mode="deep", C=3, seed=1)

    async def scenario() -> list[list[httpx.Response]]:
        async with running(app) as c:
            assert (await c.put("/v1/tasks/t", content=data, headers=OCTET)).status_code == 201
            return [await burst(c, "t", 12)]  # 3 batches of 4: the 2nd one fails

    (responses,) = asyncio.run(scenario())
    statuses = [r.status_code for r in responses]
    assert sorted(statuses) == [200] * 8 + [503] * 4, statuses
    for r in responses:
        if r.status_code == 503:
            assert_error(r, 503, "unavailable", "inference failed")
            assert int(r.headers["retry-after"]) >= 1
        else:
            assert r.json()["timings"]["batch_size"] == 4
    # One request per batch: every failed batch is followed by one that runs.
    app2 = create_app(settings(tmp_path / "b", fault_fail_every=2))

    async def sequential() -> list[int]:
        async with running(app2) as c:
            await c.put("/v1/tasks/t", content=data, headers=OCTET)
            return [(await burst(c, "t", 1))[0].status_code for _ in range(6)]

    assert asyncio.run(sequential()) == [200, 503, 200, 503, 200, 503]


def test_out_of_memory_batches_are_split_and_succeed(tmp_path, backbone):
    app = create_app(settings(tmp_path, fault_oom_over=2, max_batch_size=8, max_batch_delay_ms=300))
    data = artifact_bytes(backbone, P=2, mode="deep", C=3, seed=1)

    async def scenario() -> tuple[list[httpx.Response], httpx.Response, list[httpx.Response], str]:
        async with running(app) as c:
            await c.put("/v1/tasks/t", content=data, headers=OCTET)
            split = await burst(c, "t", 8)  # one batch of 8 → 4 + 4 → 2 + 2 + 2 + 2
            # One request of 3 images cannot be split further (a request runs in one batch): 503.
            too_big = (await burst(c, "t", 1, images=3))[0]
            after = await burst(c, "t", 2)
            return split, too_big, after, (await c.get("/metrics")).text

    split, too_big, after, metrics = asyncio.run(scenario())
    assert [r.status_code for r in split] == [200] * 8, [r.text for r in split]
    assert {r.json()["timings"]["batch_size"] for r in split} <= {1, 2}
    assert_error(too_big, 503, "unavailable", "OutOfMemoryError")
    assert [r.status_code for r in after] == [200, 200]
    assert 'vpt_rejections_total{reason="oom_split"}' in metrics


# ---------------------------------------------------------------------------------- corrupt artifact


def _task_dir(root: Path, task: str) -> Path:
    return root / "tenants" / "default" / "tasks" / task


def _flip(path: Path, offset_from_end: int = 5) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_artifact_fails_only_that_task(tmp_path, backbone):
    root = tmp_path / "store"
    with TestClient(create_app(settings(tmp_path))) as client:
        for i, task in enumerate(("warm", "cold", "other", "rolled")):
            assert (
                put(client, task, artifact_bytes(backbone, P=2, mode="deep", C=3, seed=i)).status_code == 201
            )
        assert (
            put(client, "rolled", artifact_bytes(backbone, P=3, mode="deep", C=3, seed=9)).status_code == 200
        )
        assert classify(client, "warm").status_code == 200
        assert classify(client, "other").status_code == 200

        _flip(_task_dir(root, "cold") / "v000001.safetensors")  # bit rot in data never loaded
        _flip(_task_dir(root, "warm") / "v000001.safetensors")  # ...and in data already resident
        _flip(_task_dir(root, "rolled") / "v000001.safetensors")  # an old version

        for _ in range(3):  # the failure repeats (no poisoned state), it never becomes a 500
            assert_error(classify(client, "cold"), 503, "corrupt_artifact", "cold")
        assert classify(client, "warm").status_code == 200  # the bank copy was verified when loaded
        assert classify(client, "other").status_code == 200
        assert client.get("/v1/tasks/cold").status_code == 200  # the manifest is intact
        assert_error(client.post("/v1/tasks/rolled/rollback", json={"version": 1}), 503, "corrupt_artifact")
        assert classify(client, "rolled").json()["version"] == 2  # the rollback did not happen

        (_task_dir(root, "other") / "manifest.json").write_bytes(b"{ torn")  # a corrupt manifest
        assert_error(client.get("/v1/tasks/other"), 503, "corrupt_artifact")
        r = classify(client, "warm")
        assert r.status_code == 200, r.text

        # A re-upload repairs the task.
        assert put(client, "cold", artifact_bytes(backbone, P=2, mode="deep", C=3, seed=5)).status_code == 200
        assert classify(client, "cold").status_code == 200
        assert client.get("/readyz").status_code == 200


def test_corrupt_artifact_in_a_fresh_server(tmp_path, backbone):
    """After a restart nothing is resident: the corrupt task fails alone, the others load and serve."""
    root = tmp_path / "store"
    with TestClient(create_app(settings(tmp_path))) as client:
        for i, task in enumerate(("bad", "good")):
            assert (
                put(client, task, artifact_bytes(backbone, P=2, mode="deep", C=3, seed=i)).status_code == 201
            )
    _flip(_task_dir(root, "bad") / "v000001.safetensors", offset_from_end=1)
    shutil.copytree(root, tmp_path / "copy")  # the same bytes seen by a second replica
    for store in (root, tmp_path / "copy"):
        with TestClient(create_app(settings(tmp_path, store=str(store)))) as client:
            assert_error(classify(client, "bad"), 503, "corrupt_artifact")
            assert classify(client, "good").status_code == 200
    assert os.path.exists(root)
