"""Overload and fair share against a real `vpt-serve` on 127.0.0.1.

- Fair share: tenant A floods at >= 10x the server's measured capacity while tenant B sends a steady
  low rate. B gets no rejections, A gets 429s with Retry-After, /readyz stays 200; B's p99 under the
  flood is compared with its solo p99 round by round, solo and flood phases back to back (the 2x
  target, see below).
- Bounded queues: a burst past the global queue bound answers 429 + Retry-After, requests that wait
  past `VPT_REQUEST_TIMEOUT_S` answer 504, and the server serves normally right after.
- Memory: the server's RSS (from /proc/<pid>/status) before and after a 20 s flood stays within
  `RSS_BOUND_MB`, with no upward trend during the flood.
- Admission before decode: a request that its tenant's queue bound will refuse must be refused before
  its images are decoded (`Scheduler.admit`).

The load generator is a minimal asyncio HTTP/1.1 client (`tests/server/rawhttp.py`), because client and
server share this machine's two cores; the fair-share flood runs in a process of its own so that its
event loop cannot delay B's measurements. Every loop is bounded in time.

Nothing here assumes how fast the machine is: CI may share it with other work (it must pass with one of
the two cores kept busy by another process). Rates derive from the capacity measured in the same test,
an engine that must fall behind is stopped outright (SIGSTOP) rather than raced, and every window a
scenario relies on is checked rather than assumed.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from server.tenants import generate_key
from tests.server.helpers import METRICS_AUTH, METRICS_TOKEN, artifact_bytes, write_tenants
from tests.server.rawhttp import Flood, RawClient, flood
from tests.server.server_proc import ServerProcess, descendants, engine_pid
from vpt.hub import load_backbone

# serial: these measure latency, memory and capacity under load, so the test run gives them the machine
# alone (scripts/test.sh runs the `serial` tests after the others, which share the cores).
pytestmark = [pytest.mark.integration, pytest.mark.serial]

# vit_test_small (D=96, depth 4, 64 patches) makes the engine, not HTTP, the bottleneck for 8-image
# requests on CPU: ~3 ms per image, so capacity is a few hundred images/s.
BACKBONE = "random:vit_test_small@0"
BATCH = 8  # max_batch_size, and the images in each of A's requests (a full batch each)
RSS_BOUND_MB = 64  # documented in docs/security.md


def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def json_images(n: int, seed: int = 0) -> bytes:
    return json.dumps({"images": [base64.b64encode(png(seed + i)).decode() for i in range(n)]}).encode()


def rss_mb(pid: int) -> float:
    """The server's resident memory: its process and every one it started (engine core, API servers,
    engine process)."""
    total = 0.0
    for p in [pid, *descendants(pid)]:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) / 1024
    return total


@dataclass
class Samples:
    latency_s: list[float] = field(default_factory=list)  # client-side, successful requests
    timings: list[dict[str, float]] = field(default_factory=list)  # the server's own breakdown
    failures: list[tuple[int, str]] = field(default_factory=list)

    def extend(self, other: Samples) -> None:
        self.latency_s += other.latency_s
        self.timings += other.timings
        self.failures += other.failures

    def q(self, p: float) -> float:
        return quantile(self.latency_s, p)

    def breakdown(self) -> str:
        keys = ("decode_ms", "queue_ms", "compute_ms", "total_ms")
        parts = []
        for k in keys:
            xs = [t[k] for t in self.timings]
            parts.append(f"{k[:-3]} mean {statistics.mean(xs):.1f} p99 {quantile(xs, 0.99):.1f}")
        return "; ".join(parts) + " (ms)"


def quantile(xs: list[float], p: float) -> float:
    """Nearest rank: p99 of 100 samples is the 2nd slowest, of 400 the 5th slowest."""
    return sorted(xs)[max(0, math.ceil(p * len(xs)) - 1)]


async def steady(
    client: RawClient, path: str, body: bytes, headers: dict[str, str], rate: float, seconds: float
) -> Samples:
    """Open-loop requests at a fixed rate; waits for all of them."""
    out = Samples()

    async def one() -> None:
        t0 = time.perf_counter()
        status, _, data = await client.post(path, body, headers)
        if status == 200:
            out.latency_s.append(time.perf_counter() - t0)
            out.timings.append(json.loads(data)["timings"])
        else:
            out.failures.append((status, data[:200].decode(errors="replace")))

    start, tasks = time.monotonic(), []
    while (i := len(tasks)) < rate * seconds:
        await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    return out


async def watch_ready(url: str, stop: asyncio.Event) -> list[int]:
    seen = []
    async with httpx.AsyncClient(timeout=10) as c:
        while not stop.is_set():
            seen.append((await c.get(f"{url}/readyz")).status_code)
            await asyncio.sleep(0.25)
    return seen


async def capacity(port: int, body: bytes, headers: dict[str, str], n_images: int, seconds: float) -> float:
    """Images/s the server completes with 4 clients in closed loop (after a 1 s warm-up)."""
    done = [0]

    async def loop(client: RawClient, until: float, count: bool) -> None:
        while time.monotonic() < until:
            status, _, data = await client.post("/v1/tasks/t/classify", body, headers)
            assert status == 200, data
            done[0] += n_images if count else 0

    clients = [RawClient(port) for _ in range(4)]
    await asyncio.gather(*(loop(c, time.monotonic() + 1.0, False) for c in clients))
    t0 = time.monotonic()
    await asyncio.gather(*(loop(c, t0 + seconds, True) for c in clients))
    for c in clients:
        c.close()
    return done[0] / (time.monotonic() - t0)


# ---------------------------------------------------------------------------------------- fair share

KEYS = {name: generate_key() for name in ("a", "b", "probe")}
QUOTAS = {
    # A may queue 4 full batches and send 10 requests/s (80 images/s, well under capacity): its flood
    # is refused by the rate limit (before the body is read) and by its queue bound.
    "a": {"rate_per_s": 10.0, "max_queued_images": 4 * BATCH},
    "b": {},  # defaults
    "probe": {"rate_per_s": 100000.0, "max_queued_images": 100000},  # measures capacity
}


def auth(tenant: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[tenant]}", "content-type": "application/json"}


# The same server in one process and with two API-server processes in front of the engine core: fair
# share, queue bounds and deadlines are the core's, whichever process a request came through.
API_SERVERS = pytest.mark.parametrize("api_servers", [0, 2], ids=["one-process", "2-api-servers"])


@pytest.fixture(scope="module", params=[0, 2], ids=["one-process", "2-api-servers"])
def server(tmp_path_factory, request):
    # torch_threads is left at auto (all cores but one on CPU): with torch on both cores its OpenMP
    # workers spin against the event loop, the decoders and this load generator (measured: B's p99
    # ratio 41x instead of ~5x).
    proc = start(
        tmp_path_factory.mktemp("overload"), KEYS, QUOTAS, max_queue_images=100000, api_servers=request.param
    )
    yield proc
    assert proc.stop() == 0, proc.log()[-3000:]


def start(
    tmp: Path, keys: dict[str, str], quotas: dict[str, dict[str, object]], **settings: object
) -> ServerProcess:
    """A `vpt-serve` with these tenants, max batch BATCH, and task `t` uploaded by each tenant."""
    proc = ServerProcess(
        tmp,
        backbone=BACKBONE,
        open_mode="false",
        tenants_file=write_tenants(tmp, keys, quotas),
        metrics_token=METRICS_TOKEN,  # the tests read /metrics
        max_batch_size=BATCH,
        access_log="false",
        **settings,
    ).wait_ready()
    data = artifact_bytes(load_backbone(BACKBONE), P=4, mode="deep", C=5, seed=1)
    for key in keys.values():
        r = httpx.put(
            f"{proc.url}/v1/tasks/t",
            content=data,
            headers={"authorization": f"Bearer {key}", "content-type": "application/octet-stream"},
        )
        assert r.status_code == 201, r.text
    return proc


@pytest.mark.slow
def test_fair_share_under_a_10x_flood(server, tmp_path):
    path = "/v1/tasks/t/classify"
    a_body, b_body = json_images(BATCH, seed=100), json_images(1, seed=7)
    # B: up to 20 requests/s in `rounds` rounds of a solo phase and a flood phase of `phase_s` each, back
    # to back, so that this shared machine's own load drifts fall on both sides of a round alike; 100
    # samples a phase. Every rate derives from the capacity measured first: on a machine that is busy
    # with other work, A still offers 10x what the server can do and B stays a light tenant (<= 1/4 of
    # capacity in images).
    rounds, phase_s = 5, 5.0  # the verdict is the median over the rounds (see below)
    (tmp_path / "a.json").write_bytes(a_body)

    async def scenario():
        cap = await capacity(server.port, a_body, auth("probe"), BATCH, 2.5)
        a_rate = 10 * cap / BATCH  # requests/s: 10x capacity in images
        b_rate = min(20.0, cap / 4)
        b = RawClient(server.port)
        await steady(b, path, b_body, auth("b"), b_rate, 1.0)  # warm B's connection and task
        stop = asyncio.Event()
        ready_task = asyncio.create_task(watch_ready(server.url, stop))
        solo, under, floods = [], [], []
        for _ in range(rounds):
            solo.append(await steady(b, path, b_body, auth("b"), b_rate, phase_s))
            # A's flood runs in its own process: in this one, its event loop would delay B's requests
            # and responses and that lag would be counted as the server's. At nice 5 it yields to the
            # server (a real flood's sender is another machine) but is not starved by a busy neighbour:
            # at nice 15, with one core kept busy by another process, it fell behind (~4% of a core
            # when contended; it needs up to ~10%). `offered` below checks that it sent 10x capacity.
            a_proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tests.server.rawhttp", "--port", str(server.port), "--path", path,
                "--body", str(tmp_path / "a.json"), "--key", KEYS["a"], "--rate", f"{a_rate:.1f}",
                "--seconds", str(phase_s + 1.5), "--nice", "5", stdout=subprocess.PIPE,
                cwd=Path(__file__).parents[2],
            )  # fmt: skip
            await asyncio.sleep(1.0)  # A's queue is full and its rate exhausted before B is measured
            under.append(await steady(b, path, b_body, auth("b"), b_rate, phase_s))
            out, _ = await a_proc.communicate()
            floods.append(Flood(**json.loads(out)))
            await asyncio.sleep(0.5)  # A's queued batches drain before B is measured solo again
        stop.set()
        ready = await ready_task
        b.close()
        return cap, b_rate, solo, under, floods, ready

    cap, b_rate, solo_rounds, under_rounds, floods, ready = asyncio.run(scenario())
    solo, under = Samples(), Samples()
    for s, u in zip(solo_rounds, under_rounds, strict=True):
        solo.extend(s)
        under.extend(u)
    offered = [a.sent * BATCH / (a.stopped - a.started) for a in floods]
    outcomes: dict[str, int] = {}
    for a in floods:
        for k, v in a.outcomes.items():
            outcomes[k] = outcomes.get(k, 0) + v
    sent = sum(a.sent for a in floods)
    # The verdict is per round, the flood phase against the solo phase just before it, and the median
    # over the rounds. On this shared machine the server has episodes of 1-2 s in which B's one-image
    # batches take 130-160 ms from being sent to the engine process to its reply instead of ~11 (steal
    # time ~0, cause not found); one spoils one round's p99. Pooled over the rounds such an episode made
    # the one-process ratio 5.3-8.3x (once in CI, 3 of 14 runs here; in the one with rounds recorded
    # the other three were 0.6-2.2x). The median of 5 rounds stands with two of them spoiled; a
    # fair-share regression slows every round, and the median shows it.
    p99s = [(s.q(0.99), u.q(0.99)) for s, u in zip(solo_rounds, under_rounds, strict=True)]
    ratios = [u / s for s, u in p99s]
    ratio = statistics.median(ratios)
    print(
        f"\ncapacity {cap:.0f} images/s (max_batch_size {BATCH}); A offered "
        f"{', '.join(f'{o / cap:.1f}x' for o in offered)} in {sent} requests: {outcomes}"
        f"\nB at {b_rate:.1f} requests/s of 1 image"
        f"\nB solo : n={len(solo.latency_s)} p50 {solo.q(0.5) * 1e3:.1f} ms p99 {solo.q(0.99) * 1e3:.1f} ms; "
        f"server {solo.breakdown()}"
        f"\nB flood: n={len(under.latency_s)} p50 {under.q(0.5) * 1e3:.1f} ms p99 {under.q(0.99) * 1e3:.1f} ms; "
        f"server {under.breakdown()}"
        f"\nB p99 per round (solo -> flood ms): {', '.join(f'{s * 1e3:.0f} -> {u * 1e3:.0f}' for s, u in p99s)}"
        f"\nB p99 ratio flood/solo: median of rounds {ratio:.2f} ({', '.join(f'{r:.2f}' for r in ratios)});"
        f" pooled {under.q(0.99) / solo.q(0.99):.2f}; /readyz seen {sorted(set(ready))}"
    )
    assert min(offered) >= 10 * cap * 0.95, "the generator fell behind: not a 10x flood"
    assert not solo.failures and not under.failures, (solo.failures, under.failures)  # B: no rejections
    assert len(under.latency_s) == math.ceil(b_rate * phase_s) * rounds  # ...and all of it served
    assert outcomes.get("429 rate", 0) + outcomes.get("429 queue", 0) > 0.5 * sent
    assert sum(a.retry_after_missing for a in floods) == 0
    assert outcomes.get("200", 0) > 0  # A is throttled, not starved
    assert ready and set(ready) == {200}
    # Median of the rounds in 12 runs on this 2-core box (2026-12-05, both server layouts, half of the
    # runs with another process keeping one core busy): 1.35-2.28x, 3 of 12 above the 2x target. The
    # bound catches a gross regression (5-20x before preemption and the rate gate, 41x with torch on
    # both cores in the server's process); a return to the in-process engine would show as more
    # xfails, not as failures (and so would preemption off with torch on both cores in the engine
    # process: 3.0x with four rounds, B's p50 3.7x its solo p50).
    assert ratio <= 5.0, f"B p99 under flood is {ratio:.2f}x its solo p99 (median of rounds {ratios})"
    if ratio > 2.0:
        # The 2x target holds in most runs, not all, on 2 shared cores where this test's own clients
        # compete with the server: docs/security.md ("Fair share"). Reported loudly, not asserted away.
        pytest.xfail(f"B p99 under flood is {ratio:.2f}x its solo p99 (median of rounds; target 2x)")


@pytest.mark.slow
def test_memory_stays_bounded_under_sustained_flood(server):
    """20 s of A flooding at ~300 requests/s of 8 images: RSS before/after within RSS_BOUND_MB."""
    path, body = "/v1/tasks/t/classify", json_images(BATCH, seed=200)
    pid = server.proc.pid

    async def scenario():
        stop = asyncio.Event()
        rss: list[float] = []
        # At most 64 requests in flight: on a machine too busy to answer 300 requests/s, an open loop
        # piled up a backlog of unanswered requests whose buffers the server holds (measured: a +42 MB
        # step that levelled off, with one core kept busy). That is load, not a leak; the cap keeps it
        # the same on any machine, so what grows here grows with requests served.
        task = asyncio.create_task(flood(server.port, path, body, auth("a"), 300.0, stop, max_in_flight=64))
        ready_task = asyncio.create_task(watch_ready(server.url, stop))
        for _ in range(20):
            await asyncio.sleep(1.0)
            rss.append(rss_mb(pid))
        stop.set()
        return await task, await ready_task, rss

    before = rss_mb(pid)
    a, ready, during = asyncio.run(scenario())
    time.sleep(0.5)
    after = rss_mb(pid)
    first, last = statistics.mean(during[:5]), statistics.mean(during[-5:])
    print(
        f"\nRSS before {before:.0f} MB, after {after:.0f} MB (+{after - before:.0f}); during: "
        f"{', '.join(f'{x:.0f}' for x in during)} MB; bound +{RSS_BOUND_MB} MB; A: {a.sent} requests {a.outcomes}"
    )
    assert set(ready) == {200}
    assert a.outcomes.get("429 rate", 0) > 0
    assert after - before <= RSS_BOUND_MB
    assert max(during) - before <= RSS_BOUND_MB
    assert last - first <= RSS_BOUND_MB / 2  # no steady climb during the flood


# ----------------------------------------------------------------------------- queues and deadlines


@API_SERVERS
def test_bounded_queue_429_and_deadline_504(tmp_path, api_servers):
    """One burst past every bound: 429 + Retry-After (queue full), 504 (deadline), then normal service.

    The engine process is stopped (SIGSTOP) for the burst, as an engine that has fallen behind: what
    is admitted then certainly waits past its deadline, and exactly the queue bound is admitted, however
    fast or busy this machine is. (A free-running engine made both outcomes races between the burst's
    arrival and the engine: on a machine with one core kept busy, no request outlived its deadline.)
    The deadline is long enough for the whole burst to arrive before the first admitted request
    expires and frees its place, on a slow machine too (measured below, and checked)."""
    keys = {"big": generate_key()}
    queue_images, deadline_s, burst = 200, 2.0, 60
    proc = start(
        tmp_path,
        keys,
        {"big": {"rate_per_s": 100000.0, "max_queued_images": 100000}},
        api_servers=api_servers,
        max_queue_images=queue_images,  # 25 requests of BATCH images
        request_timeout_s=deadline_s,
    )
    headers = {"authorization": f"Bearer {keys['big']}", "content-type": "application/json"}
    try:
        body = json_images(BATCH, seed=300)
        engine = engine_pid(proc.proc.pid)

        async def scenario() -> tuple[list[tuple[int, dict[str, str], bytes, float]], list[int]]:
            stop = asyncio.Event()
            ready = asyncio.create_task(watch_ready(proc.url, stop))
            clients = [RawClient(proc.port) for _ in range(burst)]

            async def post(c: RawClient) -> tuple[int, dict[str, str], bytes, float]:
                status, hdrs, data = await c.post("/v1/tasks/t/classify", body, headers)
                return status, hdrs, data, time.monotonic() - t0

            os.kill(engine, signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                out = await asyncio.gather(*(post(c) for c in clients))
            finally:
                os.kill(engine, signal.SIGCONT)
            stop.set()
            for c in clients:
                c.close()
            return out, await ready

        results, ready = asyncio.run(scenario())
        # Refusals are answered at once: the last one is when the burst had arrived.
        arrived = max((t for status, _, _, t in results if status == 429), default=float("nan"))
        by_status: dict[int, list[dict]] = {}
        for status, hdrs, data, _ in results:
            by_status.setdefault(status, []).append({"headers": hdrs, "body": json.loads(data)})
        print(
            f"\nburst of {burst} x {BATCH} images, arrived in {arrived * 1e3:.0f} ms: "
            f"{ ({s: len(v) for s, v in sorted(by_status.items())}) }"
        )
        assert by_status.get(429), f"the queue bound never refused: {by_status.keys()}"
        assert arrived < deadline_s, "the burst arrived slower than the deadline: raise deadline_s"
        assert set(by_status) == {429, 504}, by_status.keys()
        for r in by_status[429]:
            assert (
                r["body"]["error"]["type"] == "overloaded"
                and "queue is full" in r["body"]["error"]["message"]
            )
            assert int(r["headers"]["retry-after"]) >= 1
        # Admitted: the queue's worth (25 requests), or one more where the batch handed to the stopped
        # engine had left the queue before the bound was reached.
        admitted = len(by_status[504])
        assert queue_images // BATCH <= admitted <= queue_images // BATCH + 1, admitted
        for r in by_status[504]:
            assert r["body"]["error"]["type"] == "deadline_exceeded"
        assert set(ready) <= {200}
        # Expired and refused work is gone: the next request is served at once.
        r = httpx.post(f"{proc.url}/v1/tasks/t/classify", content=json_images(1), headers=headers, timeout=10)
        assert r.status_code == 200, r.text
        metrics = httpx.get(f"{proc.url}/metrics", headers=METRICS_AUTH).text
        assert 'vpt_rejections_total{reason="queue_full"}' in metrics
        assert "vpt_queue_depth_images 0.0" in metrics
    finally:
        assert proc.stop() == 0, proc.log()[-3000:]


@API_SERVERS
def test_queue_bound_is_checked_before_decoding(tmp_path, api_servers):
    keys = {"a": generate_key()}
    # A 5 s batching delay holds a first request of BATCH - 1 images in the queue (a full batch
    # would be dispatched at once), so any further 8-image request is over the tenant's bound. The
    # scenario must fit in the delay, on a busy machine too: that is checked, not assumed.
    delay_s = 5.0
    proc = start(
        tmp_path,
        keys,
        {"a": {"rate_per_s": 100000.0, "max_queued_images": BATCH}},
        api_servers=api_servers,
        max_batch_delay_ms=int(delay_s * 1000),
    )
    headers = {"authorization": f"Bearer {keys['a']}", "content-type": "application/json"}

    def decoded() -> float:
        text = httpx.get(f"{proc.url}/metrics", headers=METRICS_AUTH).text
        return sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("vpt_images_decoded_total")
        )

    try:

        async def scenario() -> list[int]:
            holder = RawClient(proc.port)
            sent = time.monotonic()
            first = asyncio.create_task(holder.post("/v1/tasks/t/classify", json_images(BATCH - 1), headers))
            for _ in range(150):  # until the first request sits in the queue
                await asyncio.sleep(0.02)
                if (
                    f"vpt_queue_depth_images {BATCH - 1}.0"
                    in httpx.get(f"{proc.url}/metrics", headers=METRICS_AUTH).text
                ):
                    break
            else:
                raise AssertionError("the first request never sat in the queue")
            before = decoded()
            clients = [RawClient(proc.port) for _ in range(10)]
            rejected = await asyncio.gather(
                *(c.post("/v1/tasks/t/classify", json_images(BATCH), headers) for c in clients)
            )
            assert time.monotonic() - sent < delay_s, "the scenario outlasted the batching delay"
            assert [s for s, _, _ in rejected] == [429] * 10
            extra = decoded() - before
            await first
            return [extra]

        (extra,) = asyncio.run(scenario())
        assert extra == 0, f"{extra:.0f} images of refused requests were decoded"
    finally:
        proc.stop()
