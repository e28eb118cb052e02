"""Open-loop HTTP load: Poisson arrivals at a fixed offered rate (asyncio + httpx), plus /metrics parsing.

Open loop (Schroeder et al., "Open Versus Closed: A Cautionary Tale", NSDI 2006): requests are sent at
their scheduled times whether or not earlier ones have returned, as independent users do. A closed loop
(N clients each waiting for its answer) slows its own arrivals when the server slows and so hides
queueing. Latency is measured from each request's *scheduled* send time, so a generator that falls
behind does not hide it either (no coordinated omission).

Bounded by construction: one point lasts `duration` seconds of arrivals plus at most `timeout` seconds of
drain; at most `max_outstanding` requests are in flight (arrivals beyond are counted as `dropped`).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from benchmarks.common import percentile

# name, optional {labels} (quoted values may hold '}', e.g. route="/v1/tasks/{task_id}"), value
_PROM_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[^"}]|"(?:[^"\\]|\\.)*")*\})?\s+(\S+)$')
_PROM_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass
class PointResult:
    """One offered rate against one server."""

    offered_rps: float  # requested arrival rate
    duration_s: float  # arrival window
    sent: int  # requests started
    ok: int  # 200 responses
    images_per_request: int  # images in each request body
    errors: dict[str, int]  # "status 429", "timeout", "connect", "dropped" (client cap) → count
    elapsed_s: float  # first arrival → last completion (includes the drain)
    throughput_rps: float  # ok / elapsed_s
    throughput_img_s: float  # images of ok requests / elapsed_s
    p50_ms: float  # latency of ok requests, from scheduled send time
    p95_ms: float
    p99_ms: float
    mean_ms: float
    server_ms: dict[str, float]  # mean of the server-reported timings (decode/queue/compute/total)
    client_cpu: float  # cores the load generator used (process CPU s / elapsed s)
    server_cpu: float | None  # cores the server process used, from /proc (None if unknown)
    batches: dict[str, Any] = field(default_factory=dict)  # from /metrics deltas (vpt-serve only)


# --- schedule --------------------------------------------------------------------------------------------
def multipart(images: Sequence[bytes], boundary: str, field: str = "images") -> tuple[bytes, str]:
    """A multipart/form-data body with one file part per image, and its Content-Type."""
    parts = [
        f'--{boundary}\r\ncontent-disposition: form-data; name="{field}"; filename="{i}"\r\n'
        f"content-type: application/octet-stream\r\n\r\n".encode()
        + data
        + b"\r\n"
        for i, data in enumerate(images)
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def poisson_arrivals(rate: float, duration: float, rng: random.Random) -> list[float]:
    """Arrival offsets in [0, duration): exponential gaps with mean 1/rate."""
    out, t = [], rng.expovariate(rate)
    while t < duration:
        out.append(t)
        t += rng.expovariate(rate)
    return out


class RawClient:
    """Minimal HTTP/1.1 keep-alive client on asyncio streams, for the hot path only.

    Why not httpx for every request: on the 2-core benchmark box httpx.AsyncClient costs ~3 ms of client
    CPU per request (measured against a trivial asyncio server: 2.7-4.5 ms/req), this client ~0.1 ms.
    With client and server on the same two cores, httpx would take a core from the server at a few
    hundred req/s and the benchmark would measure its own generator. `--client httpx` keeps the option.
    Speaks just what the servers here answer: Content-Length or chunked bodies, keep-alive.
    """

    def __init__(self, url: str, timeout: float) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.timeout = timeout
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        return await asyncio.wait_for(self._post(path, body, content_type), self.timeout)

    async def _post(self, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        if self._idle:
            reader, writer = self._idle.pop()
        else:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(
                f"POST {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\ncontent-type: {content_type}\r\n"
                f"content-length: {len(body)}\r\n\r\n".encode()
                + body
            )
            status = int((await reader.readline()).split(b" ", 2)[1])
            length, chunked, close = 0, False, False
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding":
                    chunked = b"chunked" in value.lower()
                elif name == b"connection":
                    close = b"close" in value.lower()
            if chunked:
                data = b""
                while (size := int((await reader.readline()).split(b";")[0], 16)) > 0:
                    data += await reader.readexactly(size + 2)
                    data = data[:-2]
                await reader.readline()
            else:
                data = await reader.readexactly(length)
        except BaseException:
            writer.close()  # state unknown (timeout, cancel, reset): never reuse this connection
            raise
        if close:
            writer.close()
        else:
            self._idle.append((reader, writer))
        return status, data

    async def aclose(self) -> None:
        for _, w in self._idle:
            w.close()
        self._idle.clear()


class HttpxClient:
    def __init__(self, url: str, timeout: float, max_connections: int) -> None:
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._c = httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits)

    async def post(self, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        r = await self._c.post(path, content=body, headers={"content-type": content_type})
        return r.status_code, r.content

    async def aclose(self) -> None:
        await self._c.aclose()


async def run_point(
    url: str,
    *,
    rate: float,
    duration: float,
    tasks: Sequence[str],
    weights: Sequence[float],
    bodies: Sequence[bytes],
    content_type: str,
    timeout: float = 5.0,
    max_outstanding: int = 512,
    top_k: int = 5,
    seed: int = 0,
    server_pid: int | None = None,
    metrics: bool = True,
    client: str = "raw",
    images_per_request: int = 1,
) -> PointResult:
    rng = random.Random(seed)
    arrivals = poisson_arrivals(rate, duration, rng)
    picks = rng.choices(range(len(tasks)), weights=weights, k=len(arrivals))
    errors: Counter[str] = Counter()
    latencies: list[float] = []
    timings: list[dict[str, float]] = []
    last_done = 0.0
    http: RawClient | HttpxClient = (
        RawClient(url, timeout) if client == "raw" else HttpxClient(url, timeout, max_outstanding)
    )

    async with httpx.AsyncClient(base_url=url, timeout=10) as control:
        before = await scrape(control) if metrics else None
        loop = asyncio.get_running_loop()
        cpu0, srv0 = time.process_time(), proc_cpu_seconds(server_pid)
        start = loop.time()
        in_flight: set[asyncio.Task[None]] = set()

        async def send(i: int, at: float) -> None:
            nonlocal last_done
            try:
                status, data = await http.post(
                    f"/v1/tasks/{tasks[picks[i]]}/classify?top_k={top_k}",
                    bodies[i % len(bodies)],
                    content_type,
                )
            except (asyncio.TimeoutError, httpx.TimeoutException):
                errors["timeout"] += 1
                return
            except (OSError, asyncio.IncompleteReadError, ValueError, httpx.TransportError) as e:
                errors[type(e).__name__] += 1
                return
            done = loop.time()
            last_done = max(last_done, done)
            if status != 200:
                errors[f"status {status}"] += 1
                return
            latencies.append(done - (start + at))
            t = json.loads(data).get("timings")
            if t:
                timings.append(t)

        try:
            for i, at in enumerate(arrivals):
                delay = start + at - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                if len(in_flight) >= max_outstanding:
                    errors["dropped"] += 1
                    continue
                task = asyncio.create_task(send(i, at))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            if in_flight:
                await asyncio.wait(list(in_flight), timeout=timeout + 1)
                for t in list(in_flight):
                    t.cancel()
                    errors["timeout"] += 1
        finally:
            await http.aclose()
        end = loop.time()
        cpu1, srv1 = time.process_time(), proc_cpu_seconds(server_pid)
        after = await scrape(control) if metrics else None

    elapsed = max((last_done or end) - start, duration)
    ok = len(latencies)
    server_ms = {}
    if timings:
        for k in ("decode_ms", "queue_ms", "compute_ms", "total_ms", "batch_size"):
            server_ms[k] = sum(float(t.get(k, 0.0)) for t in timings) / len(timings)
    wall = end - start
    return PointResult(
        offered_rps=rate,
        duration_s=duration,
        sent=len(arrivals) - errors["dropped"],
        ok=ok,
        images_per_request=images_per_request,
        errors=dict(errors),
        elapsed_s=elapsed,
        throughput_rps=ok / elapsed,
        throughput_img_s=ok * images_per_request / elapsed,
        p50_ms=percentile(latencies, 50) * 1000,
        p95_ms=percentile(latencies, 95) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        mean_ms=(sum(latencies) / ok * 1000) if ok else float("nan"),
        server_ms=server_ms,
        client_cpu=(cpu1 - cpu0) / wall,
        server_cpu=None if srv0 is None or srv1 is None else (srv1 - srv0) / wall,
        batches=batch_stats(before, after, wall) if before and after else {},
    )


# --- /metrics --------------------------------------------------------------------------------------------
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(client: httpx.AsyncClient) -> Samples | None:
    try:
        r = await client.get("/metrics")
    except httpx.HTTPError:
        return None
    return parse_prometheus(r.text) if r.status_code == 200 else None


def parse_prometheus(text: str) -> Samples:
    """Prometheus text format → {(name, sorted labels): value} (comments skipped)."""
    out: Samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _PROM_LINE.match(line)
        if m is None:
            continue
        labels = tuple(sorted(_PROM_LABEL.findall(m.group(2) or "")))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def histogram(samples: Samples, name: str) -> tuple[dict[float, float], float, float]:
    """(cumulative bucket counts by upper bound, sum, count) of an unlabelled histogram."""
    buckets = {}
    for (n, labels), v in samples.items():
        if n == f"{name}_bucket":
            le = dict(labels)["le"]
            buckets[float("inf") if le == "+Inf" else float(le)] = v
    return buckets, samples.get((f"{name}_sum", ()), 0.0), samples.get((f"{name}_count", ()), 0.0)


def histogram_delta(before: Samples, after: Samples, name: str) -> tuple[dict[float, float], float, float]:
    b0, s0, c0 = histogram(before, name)
    b1, s1, c1 = histogram(after, name)
    return {le: b1[le] - b0.get(le, 0.0) for le in sorted(b1)}, s1 - s0, c1 - c0


def bucket_quantile(buckets: dict[float, float], q: float) -> float:
    """Upper bound of the bucket holding quantile q (what Prometheus' histogram_quantile bounds)."""
    total = max(buckets.values(), default=0.0)
    if total <= 0:
        return float("nan")
    for le, c in sorted(buckets.items()):
        if c >= q * total:
            return le
    return float("inf")


def batch_stats(before: Samples, after: Samples, wall_s: float) -> dict[str, Any]:
    """What the server's batching did during one point: batch sizes reached, tasks per batch, engine busy."""
    sizes, size_sum, n = histogram_delta(before, after, "vpt_batch_size")
    _, task_sum, _ = histogram_delta(before, after, "vpt_batch_tasks")
    _, compute_sum, _ = histogram_delta(before, after, "vpt_batch_compute_seconds")
    _, wait_sum, waits = histogram_delta(before, after, "vpt_queue_wait_seconds")
    if n <= 0:
        return {"batches": 0}
    per_bucket, prev = {}, 0.0
    for le, c in sorted(sizes.items()):
        if c - prev > 0:
            per_bucket["+Inf" if le == float("inf") else f"<={le:g}"] = int(c - prev)
        prev = c
    return {
        "batches": int(n),
        "mean_batch": size_sum / n,
        "p50_batch_le": bucket_quantile(sizes, 0.5),
        "max_batch_le": bucket_quantile(sizes, 1.0),
        "histogram": per_bucket,  # batches per size bucket
        "mean_tasks_per_batch": task_sum / n,
        "engine_busy": compute_sum / wall_s,  # fraction of wall time the engine was computing
        "engine_img_s": size_sum / compute_sum if compute_sum > 0 else float("nan"),
        "mean_queue_ms": wait_sum / waits * 1000 if waits else float("nan"),
    }


def proc_cpu_seconds(pid: int | None) -> float | None:
    """user + system CPU seconds of a process, its threads and its live child processes, recursively
    (Linux /proc): a CPU vpt-serve computes in an engine process of its own."""
    split = proc_cpu_split(pid)
    return None if split is None else sum(split)


def proc_cpu_split(pid: int | None) -> tuple[float, float] | None:
    """(CPU seconds outside the engine, in the engine process): the front end and the engine of a CPU
    vpt-serve, apart, whatever its processes (`proc_cpu_by_role`)."""
    roles = proc_cpu_by_role(pid)
    if roles is None:
        return None
    return sum(v for k, v in roles.items() if k != "engine"), roles.get("engine", 0.0)


def proc_cpu_by_role(pid: int | None) -> dict[str, float] | None:
    """CPU seconds of a vpt-serve and its live descendants by role, from their names (/proc/<pid>/comm,
    `server.threads.name_process`): "engine" (the engine process), "core" (the engine core), "api" (the
    API servers, together), "server" (the process started: the supervisor, or the whole front end with
    VPT_API_SERVERS=0), "other"."""
    if pid is None:
        return None
    roles: dict[str, float] = {}
    todo = [pid]
    try:
        while todo:
            p = todo.pop()
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{p}/comm") as f:
                comm = f.read().strip()
            role = (
                "server" if p == pid
                else "engine" if comm == "vpt-engine"
                else "core" if comm == "vpt-core"
                else "api" if comm.startswith("vpt-api")
                else "other"
            )  # fmt: skip
            cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            roles[role] = roles.get(role, 0.0) + cpu
            todo += [int(c) for t in os.listdir(f"/proc/{p}/task") for c in _children(p, t)]
    except (OSError, ValueError, IndexError):
        if not roles:
            return None
    return roles


def _children(pid: int, tid: str) -> list[str]:
    try:
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            return f.read().split()
    except OSError:  # the thread ended meanwhile
        return []
