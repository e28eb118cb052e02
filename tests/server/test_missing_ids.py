"""Requests for task ids that do not exist leave no state behind (in-process app with lifespan).

A task id is the caller's choice. Before, every id classified once kept a residency entry and usage
counters for good (~0.8 KB per id, measured with tracemalloc): a caller could grow the server's memory
without bound, and a task later created under such an id showed their errors as its usage.

Memory is counted in blocks of Python's small-object allocator (`sys.getallocatedblocks()`, free to
read), not with tracemalloc: tracing makes each request ~3x slower (20,000 would take over a minute),
and it counts a table the interpreter rebuilds while it traces (the interned strings, ~4 MB: every
id goes through pathlib, which interns it) as new memory, since the old table was never traced.
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import time
from typing import Any

import pytest

from server.app import create_app
from server.settings import Settings
from tests.server.helpers import BACKBONE_SPEC, artifact_bytes, png_bytes
from vpt.hub import load_backbone

IDS = 20_000  # distinct missing ids, CONCURRENCY at a time
CONCURRENCY = 100
PNG = png_bytes(0, (8, 8))
OCTET = {"content-type": "application/octet-stream"}


async def call(
    app: Any, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """One request straight through the app's ASGI interface, as the HTTP server would make it
    (httpx's ASGI transport costs as much again per request, and this test sends 20,000)."""
    sent, done, status, chunks = False, asyncio.Event(), 0, []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()  # the client stays connected until the response is complete
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    hdrs = [(b"host", b"vpt"), (b"content-length", str(len(body)).encode())]
    hdrs += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": hdrs,
        "client": ("127.0.0.1", 50000),
        "server": ("vpt", 80),
    }
    await app(scope, receive, send)
    done.set()
    text = b"".join(chunks)
    return status, json.loads(text) if text else None


async def classify(app: Any, task: str) -> tuple[int, Any]:
    return await call(app, "POST", f"/v1/tasks/{task}/classify", PNG, {"content-type": "image/png"})


async def flood(app: Any, ids: range, prefix: str = "missing") -> None:
    """Classify each id once, CONCURRENCY at a time; every one must be a 404 not_found."""
    for start in range(ids.start, ids.stop, CONCURRENCY):
        batch = range(start, min(start + CONCURRENCY, ids.stop))
        for status, body in await asyncio.gather(*(classify(app, f"{prefix}-{i}") for i in batch)):
            assert status == 404 and body["error"]["type"] == "not_found", (status, body)


async def settle() -> None:
    """Let the residency's last background lookups finish, so what they hold is not counted."""
    await asyncio.sleep(0.1)
    gc.collect()


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(BACKBONE_SPEC)


def test_missing_ids_leave_no_state_and_a_new_task_starts_clean(tmp_path, backbone) -> None:
    settings = Settings(
        backbone=BACKBONE_SPEC,
        store=str(tmp_path / "store"),
        open_mode=True,  # no API keys, no rate limit: nothing slows the flood down
        access_log=False,
        # A request for a missing id never reaches the engine; computing in process only saves the
        # engine process's start-up.
        engine_process=False,
    )
    app = create_app(settings)
    task = artifact_bytes(backbone, P=2, mode="deep", C=3, seed=1)

    async def scenario() -> None:
        async with app.router.lifespan_context(app):
            services = app.state.services
            residency, stats = services.core.scheduler.residency, services.core.task_stats
            # A real task, used once: it has state and counters, which must survive the flood.
            assert (await call(app, "PUT", "/v1/tasks/real", task, OCTET))[0] == 201
            assert (await classify(app, "real"))[0] == 200
            assert (len(residency), len(stats)) == (1, 1)

            await flood(app, range(500), "warm")  # first-use allocations of every code path
            await settle()
            blocks_before = sys.getallocatedblocks()
            t0 = time.perf_counter()
            await flood(app, range(IDS))
            elapsed = time.perf_counter() - t0
            await settle()
            blocks_growth = sys.getallocatedblocks() - blocks_before
            print(f"{IDS} missing ids in {elapsed:.1f}s: {blocks_growth:+d} allocator blocks")

            # Every per-task structure holds the real task only.
            assert (len(residency), len(stats)) == (1, 1)
            assert residency.knows("default", "real") and not residency.knows("default", "missing-7")
            # Memory: Python's small-object allocator (objects up to 512 B: every key, entry and
            # counter a per-id structure would add) holds no more blocks than 2 MiB could fill. The
            # leak was ~9 blocks, ~0.8 KiB per id (+180,000 blocks here).
            assert blocks_growth <= 2 * 2**20 // 512, blocks_growth

            # One of those ids, now created: 201 (it is new), and it starts with clean usage.
            status, body = await call(app, "PUT", "/v1/tasks/missing-7", task, OCTET)
            assert status == 201, body
            zero = {"requests": 0, "images": 0, "errors": 0, "last_used": None}
            assert (await call(app, "GET", "/v1/tasks/missing-7"))[1]["usage"] == zero
            # ... and counts from now on, as the real task counted its one request.
            assert (await classify(app, "missing-7"))[0] == 200
            assert (await call(app, "GET", "/v1/tasks/missing-7"))[1]["usage"]["requests"] == 1
            assert (await call(app, "GET", "/v1/tasks/real"))[1]["usage"]["requests"] == 1

    asyncio.run(scenario())


def test_a_task_deleted_elsewhere_loses_its_usage(tmp_path, backbone) -> None:
    """Replicas share a store: a task deleted through another one is found gone here after the
    version TTL; its counters go with it, so a task created again under its id starts clean."""
    settings = Settings(
        backbone=BACKBONE_SPEC,
        store=str(tmp_path / "store"),
        open_mode=True,
        access_log=False,
        engine_process=False,
        version_ttl_s=0.05,
    )
    app = create_app(settings)
    task = artifact_bytes(backbone, P=2, mode="deep", C=3, seed=1)

    async def scenario() -> None:
        async with app.router.lifespan_context(app):
            services = app.state.services
            residency = services.core.scheduler.residency
            assert (await call(app, "PUT", "/v1/tasks/t", task, OCTET))[0] == 201
            assert (await classify(app, "t"))[0] == 200
            services.store.delete("default", "t")  # as another replica would
            await asyncio.sleep(0.1)
            # The version check is due: this request is served from what is resident (at most one
            # TTL stale) and starts the check, which finds the task gone; the next one gets a 404.
            assert (await classify(app, "t"))[0] == 200
            deadline = time.monotonic() + 10
            while residency.knows("default", "t") and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert (await classify(app, "t"))[0] == 404
            assert (len(residency), len(services.core.task_stats)) == (0, 0)
            assert (await call(app, "PUT", "/v1/tasks/t", task, OCTET))[0] == 201
            usage = (await call(app, "GET", "/v1/tasks/t"))[1]["usage"]
            assert usage == {"requests": 0, "images": 0, "errors": 0, "last_used": None}

    asyncio.run(scenario())
