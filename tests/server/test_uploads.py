"""Uploads that create tasks under a task limit wait for the tenant's creation lock on the event loop,
not in the thread pool that every task route shares (server/uploads.py).

The API test holds a tenant's creation lock from outside the server (the local store's flock, as
another server process on the directory would hold it, or a replica an S3 lease), sends that tenant
more concurrent creates than the default pool has threads (min(32, CPUs + 4)), and checks that
another tenant's `GET /v1/tasks` still answers at once and that one thread, not one per upload, waits
for the lock. Before the fix each upload waited in a pool thread: the listing waited for the lock too.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from prompt_store.local import LocalStore
from server.app import create_app
from server.tenants import generate_key
from server.uploads import GateTimeout, KeyedGate
from tests.server.helpers import BACKBONE_SPEC, artifact_bytes, keyed_settings
from vpt.hub import load_backbone

LIMIT = 3
CREATES = 40  # more than the default pool's threads on any machine (at most 32)
KEYS = {"acme": generate_key(), "beta": generate_key()}


def auth(tenant: str, **extra: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[tenant]}", **extra}


def threads_waiting_for(lock_file: Path) -> int:
    """Threads of this process inside LocalStore._locked on `lock_file` (polling for the flock)."""
    n = 0
    for frame in sys._current_frames().values():
        f: Any = frame
        while f is not None:
            if f.f_code.co_name == "_locked" and f.f_locals.get("lock_file") == lock_file:
                n += 1
                break
            f = f.f_back
    return n


def test_creates_waiting_for_the_lock_leave_other_tenants_served(tmp_path: Path) -> None:
    backbone = load_backbone(BACKBONE_SPEC)
    root = tmp_path / "store"
    store = LocalStore(root, lock_timeout=60.0)  # the creates wait while the test holds the lock
    settings = keyed_settings(tmp_path, KEYS, {"acme": {"max_tasks": LIMIT}})
    octet = {"content-type": "application/octet-stream"}
    with TestClient(create_app(settings, store=store)) as client:
        services = client.app.state.services  # type: ignore[attr-defined]
        r = client.put(
            "/v1/tasks/b0",
            content=artifact_bytes(backbone, P=2, mode="shallow", C=3, seed=1),
            headers=auth("beta", **octet),
        )
        assert r.status_code == 201, r.text
        lock_file = root / "tenants" / "acme" / ".create-lock"
        lock_file.parent.mkdir(parents=True)
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)  # another process holds acme's creation lock
        statuses: dict[int, int] = {}
        blobs = [artifact_bytes(backbone, P=2, mode="shallow", C=3, seed=100 + i) for i in range(CREATES)]

        def create(i: int) -> None:
            r = client.put(f"/v1/tasks/new-{i}", content=blobs[i], headers=auth("acme", **octet))
            statuses[i] = r.status_code

        uploads = [threading.Thread(target=create, args=(i,)) for i in range(CREATES)]
        try:
            for t in uploads:
                t.start()

            # Every upload is queued for acme's creates and the first waits on the flock (fixed), or
            # the pool's threads all wait on the flock (before the fix; the rest queue for a thread).
            def arrived() -> bool:
                waiting = threads_waiting_for(lock_file)
                return waiting >= 2 or (waiting == 1 and services.uploads.creates.users("acme") == CREATES)

            deadline = time.monotonic() + 20
            while not arrived():
                assert time.monotonic() < deadline, "the uploads did not arrive"
                time.sleep(0.02)

            listing: dict[str, Any] = {}
            lister = threading.Thread(
                target=lambda: listing.update(r=client.get("/v1/tasks", headers=auth("beta")))
            )
            started = time.monotonic()
            lister.start()
            lister.join(timeout=10)
            assert "r" in listing, "beta's GET /v1/tasks waited for acme's creation lock"
            assert listing["r"].status_code == 200 and time.monotonic() - started < 5
            assert [t["task_id"] for t in listing["r"].json()["tasks"]] == ["b0"]
            assert threads_waiting_for(lock_file) == 1  # one thread per tenant, not one per upload
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            for t in uploads:
                t.join(timeout=60)
        assert sorted(statuses.values()) == [201] * LIMIT + [403] * (CREATES - LIMIT)
        assert len(services.uploads.creates) == 0  # no state left for acme
        # A new version of a live task never queues behind creates or the lock.
        r = client.put("/v1/tasks/b0", content=blobs[0], headers=auth("beta", **octet))
        assert r.status_code == 200, r.text


# ------------------------------------------------------------------------------------- KeyedGate
def test_gate_runs_one_call_per_key_and_keeps_no_idle_state() -> None:
    running: dict[str, int] = {"a": 0, "b": 0}
    most: dict[str, int] = {"a": 0, "b": 0}
    both = threading.Event()  # set while calls of "a" and "b" run at the same time
    guard = threading.Lock()

    def work(key: str) -> str:
        with guard:
            running[key] += 1
            most[key] = max(most[key], running[key])
            if running["a"] and running["b"]:
                both.set()
        time.sleep(0.05)
        with guard:
            running[key] -= 1
        return key

    async def main() -> list[str]:
        gate = KeyedGate()
        calls = [gate.run(k, lambda k=k: work(k), timeout=10) for k in "aaaabbbb"]
        out = await asyncio.gather(*calls)
        assert len(gate) == 0
        return out

    assert asyncio.run(main()) == list("aaaabbbb")
    assert most == {"a": 1, "b": 1} and both.is_set()


def test_gate_holds_the_key_until_a_cancelled_call_ends_and_times_out_waiters() -> None:
    release = threading.Event()
    second_started = threading.Event()

    async def main() -> None:
        gate = KeyedGate()
        first = asyncio.create_task(gate.run("a", lambda: release.wait(10), timeout=10))
        await asyncio.sleep(0.05)
        first.cancel()  # the caller went away; its thread still runs
        with pytest.raises(asyncio.CancelledError):
            await first
        with pytest.raises(GateTimeout):
            await gate.run("a", second_started.set, timeout=0.2)
        assert not second_started.is_set() and len(gate) == 1
        second = asyncio.create_task(gate.run("a", second_started.set, timeout=10))
        await asyncio.sleep(0.1)
        assert not second_started.is_set()  # no second thread while the first one runs
        release.set()
        await second
        assert second_started.is_set() and len(gate) == 0

    asyncio.run(main())
