"""One server, whatever the number of API-server processes (issue I): a real `vpt-serve` with
VPT_API_SERVERS=3 on 127.0.0.1, each request on a connection of its own so that the kernel spreads them
over the three processes (the access log says which one served each).

- a task uploaded, replaced, rolled back or deleted through one API server is what the next request
  through any of them runs on;
- /metrics from any API server counts every request, exactly; the rate limit and `max_tasks` hold for
  the whole server;
- an API server that dies is replaced and the others' requests go on; the engine core's death fails
  what is in flight with 503 and `vpt-serve` exits 1; SIGTERM drains every process and exits 0.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
import uuid
from pathlib import Path

import httpx
import pytest

from server.tenants import generate_key
from tests.server.helpers import (
    BACKBONE_SPEC,
    METRICS_AUTH,
    METRICS_TOKEN,
    artifact_bytes,
    png_bytes,
    write_tenants,
)
from tests.server.server_proc import ServerProcess, comm, descendants
from tests.server.test_engine_process import gone
from tests.server.test_integration import metric
from vpt.hub import load_backbone

pytestmark = pytest.mark.integration

N = 3
OCTET = {"content-type": "application/octet-stream"}


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(BACKBONE_SPEC)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = ServerProcess(
        tmp_path_factory.mktemp("n3"), backbone=BACKBONE_SPEC, api_servers=N, metrics_token=METRICS_TOKEN
    ).wait_ready()
    all_serving(proc)
    yield proc
    assert proc.stop() == 0, proc.log()[-3000:]


def api_servers(proc: ServerProcess, wait_for: int = 0) -> dict[int, str]:
    """pid -> name of the API servers running (waiting, up to 60 s, until there are `wait_for`)."""
    deadline = time.monotonic() + 60
    while True:
        found = {p: comm(p) for p in descendants(proc.proc.pid) if comm(p).startswith("vpt-api")}
        if len(found) >= wait_for or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def all_serving(proc: ServerProcess, n: int = N) -> ServerProcess:
    """Wait until each of the `n` API servers has answered a request (a process that exists may still
    be starting; until it serves, the kernel hands the connections to the others)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ids = [uuid.uuid4().hex for _ in range(4 * n)]
        for rid in ids:
            httpx.get(f"{proc.url}/healthz", headers={"x-request-id": rid})  # a fresh connection each
        seen = set(served_by(proc, ids).values())
        if len(seen) >= n:
            return proc
        time.sleep(0.2)
    raise AssertionError(f"not all {n} API servers serve:\n{proc.log()[-3000:]}")


def served_by(proc: ServerProcess, request_ids: list[str]) -> dict[str, str]:
    """request id -> the API server that logged it (its access log line)."""
    found = {}
    for line in proc.log().splitlines():
        m = re.search(r"\[(vpt-api-\d+)\] vpt\.access: .*\"request_id\": \"([0-9a-f]+)\"", line)
        if m and m.group(2) in request_ids:
            found[m.group(2)] = m.group(1)
    return found


async def classify_everywhere(url: str, task: str, n: int = 24) -> list[httpx.Response]:
    """`n` classify requests at once, each on a fresh connection, with request ids to trace them."""

    async def one(i: int) -> httpx.Response:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            files = [("images", ("x.png", png_bytes(i)))]
            return await c.post(
                f"/v1/tasks/{task}/classify", files=files, headers={"x-request-id": uuid.uuid4().hex}
            )

    return list(await asyncio.gather(*(one(i) for i in range(n))))


def test_task_changes_through_one_api_server_reach_every_other(server, backbone):
    url = server.url
    assert len(api_servers(server, wait_for=N)) == N
    ids: list[str] = []

    def versions_everywhere(task: str) -> set[object]:
        rs = asyncio.run(classify_everywhere(url, task))
        ids.extend(r.headers["x-request-id"] for r in rs)
        return {r.json()["version"] if r.status_code == 200 else r.status_code for r in rs}

    for version, seed in ((1, 0), (2, 1)):  # create, then replace: each classified at once everywhere
        r = httpx.put(f"{url}/v1/tasks/t", content=artifact_bytes(backbone, P=3, mode="deep", C=4, seed=seed),
                      headers=OCTET)  # fmt: skip
        assert r.status_code in (200, 201) and r.json()["version"] == version, r.text
        assert versions_everywhere("t") == {version}
    r = httpx.post(f"{url}/v1/tasks/t/rollback", json={"version": 1})
    assert r.status_code == 200, r.text
    assert versions_everywhere("t") == {1}
    assert httpx.delete(f"{url}/v1/tasks/t").status_code == 204
    assert versions_everywhere("t") == {404}
    # Usage counts every API server's requests: the task's counters live in the core.
    r = httpx.put(f"{url}/v1/tasks/u", content=artifact_bytes(backbone, P=0, mode="shallow", C=3, seed=2),
                  headers=OCTET)  # fmt: skip
    assert r.status_code == 201
    rs = asyncio.run(classify_everywhere(url, "u", 12))
    ids.extend(r.headers["x-request-id"] for r in rs)
    usage = httpx.get(f"{url}/v1/tasks/u").json()["usage"]
    assert (usage["requests"], usage["images"], usage["errors"]) == (12, 12, 0)
    # More than one API server took part (the kernel spreads connections; all three, nearly always).
    by = served_by(server, ids)
    assert len(by) == len(ids) and len(set(by.values())) >= 2, set(by.values())


def test_metrics_from_any_api_server_count_every_request(server, backbone):
    url = server.url
    r = httpx.put(f"{url}/v1/tasks/m", content=artifact_bytes(backbone, P=2, mode="shallow", C=3, seed=3),
                  headers=OCTET)  # fmt: skip
    assert r.status_code == 201

    def images_total() -> list[float]:
        # Fresh connections: the scrapes land on different API servers, and must all agree.
        return [
            metric(
                httpx.get(f"{url}/metrics", headers=METRICS_AUTH).text, "vpt_images_total", route="classify"
            )
            for _ in range(6)
        ]

    (before,) = set(images_total())
    rs = asyncio.run(classify_everywhere(url, "m", 30))
    assert {r.status_code for r in rs} == {200}
    assert set(images_total()) == {before + 30}
    text = httpx.get(f"{url}/metrics", headers=METRICS_AUTH).text
    assert metric(text, "vpt_images_decoded_total") >= before + 30
    assert metric(text, "vpt_batch_size_count") > 0  # the core's own metrics, in the same scrape
    assert "vpt_bank_resident_tasks" in text and "vpt_queue_depth_images 0.0" in text


def test_rate_limits_and_task_quotas_hold_for_the_whole_server(tmp_path, backbone):
    keys = {"a": generate_key()}
    rate, burst = 3.0, 6  # a tenant's burst is 2 s worth
    proc = ServerProcess(
        tmp_path,
        backbone=BACKBONE_SPEC,
        api_servers=N,
        open_mode="false",
        tenants_file=write_tenants(tmp_path, keys, {"a": {"rate_per_s": rate, "max_tasks": 3}}),
    ).wait_ready()
    all_serving(proc)
    headers = {"authorization": f"Bearer {keys['a']}"}
    try:

        async def burst_of(n: int, make: object) -> tuple[list[httpx.Response], float]:
            async def one(i: int) -> httpx.Response:
                async with httpx.AsyncClient(base_url=proc.url, timeout=60, headers=headers) as c:
                    return await make(c, i)  # type: ignore[operator]

            t0 = time.monotonic()
            rs = list(await asyncio.gather(*(one(i) for i in range(n))))
            return rs, time.monotonic() - t0

        async def get_info(c: httpx.AsyncClient, i: int) -> httpx.Response:
            return await c.get("/v1/info", headers={"x-request-id": uuid.uuid4().hex})

        # The burst proves one bucket only if it reached two API servers; which process accepts a new
        # connection on the shared socket is the kernel's choice, and on a busy machine one process has
        # taken all 30 (CI). Then the burst is tried again, on a full bucket, at most 5 times.
        for _ in range(5):
            rs, took = asyncio.run(burst_of(30, get_info))
            ok = sum(r.status_code == 200 for r in rs)
            assert {r.status_code for r in rs} == {200, 429}
            # One bucket for the server: the burst and what refilled meanwhile. Per-process buckets
            # would have let up to N times the burst through.
            assert burst <= ok <= burst + rate * took + 1, (ok, took)
            served = set(served_by(proc, [r.headers["x-request-id"] for r in rs]).values())
            time.sleep(burst / rate)  # the bucket refills
            if len(served) >= 2:
                break
        else:
            raise AssertionError(f"5 bursts of 30 connections each reached one API server only: {served}")

        data = [artifact_bytes(backbone, P=1, mode="shallow", C=2, seed=i) for i in range(burst)]

        async def put_task(c: httpx.AsyncClient, i: int) -> httpx.Response:
            return await c.put(f"/v1/tasks/q{i}", content=data[i], headers=OCTET)

        rs, _ = asyncio.run(burst_of(burst, put_task))
        codes = sorted(r.status_code for r in rs)
        assert codes == [201] * 3 + [403] * (burst - 3), [r.text for r in rs]
    finally:
        assert proc.stop() == 0, proc.log()[-3000:]


def test_a_dead_api_server_is_replaced_and_the_others_requests_go_on(tmp_path, backbone):
    proc = ServerProcess(tmp_path, backbone=BACKBONE_SPEC, api_servers=N, access_log="false").wait_ready()
    try:
        r = httpx.put(f"{proc.url}/v1/tasks/t", content=artifact_bytes(backbone, P=2, mode="deep", C=3, seed=0),
                      headers=OCTET)  # fmt: skip
        assert r.status_code == 201
        before = api_servers(proc, wait_for=N)
        victim = next(iter(before))

        async def scenario() -> list[object]:
            load = asyncio.ensure_future(classify_everywhere(proc.url, "t", 60))
            await asyncio.sleep(0.05)
            os.kill(victim, signal.SIGKILL)
            return await asyncio.gather(load, return_exceptions=True)

        (outcome,) = asyncio.run(scenario())
        # Requests on the killed process's connections may fail (their connection dropped); every
        # request the others took was served.
        assert not isinstance(outcome, BaseException) or isinstance(outcome, httpx.TransportError)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            now = api_servers(proc)
            if len(now) == N and victim not in now:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"not replaced: {api_servers(proc)}\n{proc.log()[-3000:]}")
        assert sorted(api_servers(proc).values()) == sorted(before.values())  # the same slot
        deadline = time.monotonic() + 30
        while httpx.get(f"{proc.url}/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        rs = asyncio.run(classify_everywhere(proc.url, "t", 24))
        assert {r.status_code for r in rs} == {200}
    finally:
        assert proc.stop() == 0, proc.log()[-3000:]
    assert "replacing it" in proc.log()


async def _requests_queued(url: str, n: int) -> asyncio.Future:
    """`n` classify requests of task "t" on fresh connections, returned once all `n` images wait in the
    core's queue (`vpt_queue_depth_images`, read from /metrics with the scrape token): in flight for
    certain, not merely sent. A fixed sleep instead let a busy machine kill or stop the server while
    some connections still sat in the listen backlog, where a reset, not an answer, is their due."""
    load = asyncio.ensure_future(classify_everywhere(url, "t", n))
    deadline = time.monotonic() + 60
    async with httpx.AsyncClient(base_url=url, headers=METRICS_AUTH) as c:
        while (queued := metric((await c.get("/metrics")).text, "vpt_queue_depth_images")) < n:
            assert time.monotonic() < deadline and not load.done(), f"{queued} of {n} queued"
            await asyncio.sleep(0.05)
    return load


def test_engine_core_death_fails_what_is_in_flight_with_503_and_exits_1(tmp_path, backbone):
    # A 3 s batching delay keeps the requests in the core's queue when it is killed.
    proc = ServerProcess(
        tmp_path,
        backbone=BACKBONE_SPEC,
        api_servers=2,
        max_batch_delay_ms=3000,
        access_log="false",
        metrics_token=METRICS_TOKEN,
    ).wait_ready()
    r = httpx.put(f"{proc.url}/v1/tasks/t", content=artifact_bytes(backbone, P=2, mode="deep", C=3, seed=0),
                  headers=OCTET)  # fmt: skip
    assert r.status_code == 201
    everyone = descendants(proc.proc.pid)
    (core,) = [p for p in everyone if comm(p) == "vpt-core"]

    async def scenario() -> tuple[list[httpx.Response], int]:
        load = await _requests_queued(proc.url, 8)
        os.kill(core, signal.SIGKILL)
        rs = await load
        async with httpx.AsyncClient(base_url=proc.url) as c:
            health = (await c.get("/healthz")).status_code
        return rs, health

    rs, health = asyncio.run(scenario())
    assert {r.status_code for r in rs} == {503}, [r.text for r in rs]
    assert {r.json()["error"]["type"] for r in rs} == {"unavailable"}
    assert health == 503
    assert proc.proc.wait(timeout=60) == 1
    proc.stop()
    assert "the engine core exited" in proc.log()
    # The core's engine process (and fork server) see their pipes close and exit on their own.
    assert all(gone(p) for p in everyone)


def test_sigterm_drains_every_process_and_exits_0(tmp_path, backbone):
    # A 3 s batching delay holds the requests in the core's queue when SIGTERM arrives.
    proc = ServerProcess(
        tmp_path,
        backbone=BACKBONE_SPEC,
        api_servers=N,
        max_batch_delay_ms=3000,
        access_log="false",
        metrics_token=METRICS_TOKEN,
    ).wait_ready()
    r = httpx.put(f"{proc.url}/v1/tasks/t", content=artifact_bytes(backbone, P=2, mode="deep", C=3, seed=0),
                  headers=OCTET)  # fmt: skip
    assert r.status_code == 201
    api_servers(proc, wait_for=N)
    everyone = {p: comm(p) for p in descendants(proc.proc.pid)}
    assert sum(name.startswith("vpt-") for name in everyone.values()) == N + 2  # + the core, its engine

    async def scenario() -> list[httpx.Response]:
        load = await _requests_queued(proc.url, 12)
        proc.terminate()
        return await load

    rs = asyncio.run(scenario())
    assert {r.status_code for r in rs} == {200}, [r.text for r in rs]
    assert proc.proc.wait(timeout=60) == 0
    proc.stop()
    # The server's own processes stopped before the supervisor exited; multiprocessing's helpers (its
    # resource tracker, the core's fork server) follow within seconds.
    assert not [p for p, name in everyone.items() if name.startswith("vpt-") and Path(f"/proc/{p}").exists()]
    assert all(gone(p) for p in everyone)
    assert not list(Path("/dev/shm").glob(f"vpt-serve-{proc.proc.pid}-*"))  # its run directory


def test_api_servers_that_cannot_start_stop_the_server_with_status_3(tmp_path):
    # An arena no file system here can hold: each API server fails at start-up, and replacing it
    # would fail alike.
    proc = ServerProcess(tmp_path, backbone=BACKBONE_SPEC, api_servers=2, api_arena_bytes=1 << 50)
    assert proc.proc.wait(timeout=120) == 3, proc.log()[-3000:]
    proc.stop()
    assert "could not start" in proc.log()


def test_sighup_while_api_servers_start_kills_none(tmp_path):
    """`kill -HUP` (re-read the tenants file) reaches API servers that are still starting: they ignore
    it until their handler is installed, instead of dying of it."""
    proc = ServerProcess(tmp_path, backbone=BACKBONE_SPEC, api_servers=2)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(api_servers(proc)) < 2:
            time.sleep(0.01)
        for _ in range(5):
            proc.proc.send_signal(signal.SIGHUP)
            time.sleep(0.05)
        proc.wait_ready()
        all_serving(proc, 2)
    finally:
        assert proc.stop() == 0, proc.log()[-3000:]
    assert "replacing it" not in proc.log()
