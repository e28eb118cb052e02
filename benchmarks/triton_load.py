"""Closed-loop load on vpt-serve's Open Inference Protocol (/v2) from Triton's own HTTP client.

Triton's `perf_analyzer` is what Triton users measure a v2 server with; where it cannot be installed,
this driver does the same kind of run with `tritonclient.http` (the client Triton ships): N client
threads, each sending its next request as soon as the last one is answered (a closed loop, like
perf_analyzer's `--concurrency-range`), for a fixed time, at each concurrency and images per request.
Every request is one BYTES input of encoded JPEGs in the binary tensor data extension, shaped as the
model's metadata says (`GET /v2/models/<task>`); the input and output names come from there too.

Closed, not open loop (benchmarks/loadgen.py says why open loop is the fair measure of latency under a
given load): this run answers "how many images per second at N outstanding requests, and at what
latency", which is what perf_analyzer reports and what a Triton user compares.

    # against a running server (any host; keyed servers take --api-key, sent as a Bearer token)
    .venv/bin/python -m benchmarks.triton_load --url http://127.0.0.1:8000 --task pets --api-key $KEY
    # starts vpt-serve on 127.0.0.1 itself (random:vit_test_tiny on CPU), uploads one task, and runs the
    # same loop over /v1 classify with benchmarks.load's HTTP client, on the same server, for comparison
    .venv/bin/python -m benchmarks.triton_load
    # Triton's perf_analyzer instead of this client (where it is installed; benchmarks/gpu_check.sh)
    .venv/bin/python -m benchmarks.triton_load --perf-analyzer
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import csv
import dataclasses
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import tritonclient.http as tc
from tritonclient.utils import InferenceServerException

from benchmarks.common import format_table, percentile, write_json


@dataclass
class LoopResult:
    """One closed-loop run: `concurrency` clients for `duration_s` seconds."""

    api: str  # "v2 tritonclient", "v2 perf_analyzer" or "v1 loadgen"
    images_per_request: int  # encoded images in each request
    concurrency: int  # requests outstanding at any time (client threads or coroutines)
    duration_s: float  # measured window
    ok: int  # requests answered 200 with one prediction per image
    errors: dict[str, int]  # "status 429", "timeout", exception type → count
    img_s: float  # images of ok requests per second
    req_s: float  # ok requests per second
    p50_ms: float  # latency of ok requests
    p99_ms: float
    mean_ms: float
    client_cpu: float  # cores the driver's process used over the run (warm-up included); nan if unknown


# --- requests ------------------------------------------------------------------------------------------------
def model_io(url: str, task: str, headers: dict[str, str]) -> tuple[str, list[int], list[str]]:
    """(the BYTES input's name, its declared shape, every output's name) from the model's metadata."""
    client = tc.InferenceServerClient(hostport(url), connection_timeout=10, network_timeout=30)
    try:
        meta = client.get_model_metadata(task, headers=headers)
    finally:
        client.close()
    (inp,) = [i for i in meta["inputs"] if i["datatype"] == "BYTES"]
    return inp["name"], [int(d) for d in inp["shape"]], [o["name"] for o in meta["outputs"]]


def batch_shape(declared: Sequence[int], n: int) -> list[int]:
    """The shape of n images for an input declared as `declared` (batch first; -1 = variable)."""
    return [n] + [1 if d < 0 else d for d in declared[1:]]


def hostport(url: str) -> str:
    """tritonclient.http wants host:port, not a URL."""
    parts = urlsplit(url if "//" in url else f"http://{url}")
    return f"{parts.hostname}:{parts.port or 80}"


def triton_loop(
    url: str,
    task: str,
    groups: Sequence[Sequence[bytes]],
    *,
    concurrency: int,
    duration: float,
    warmup: float,
    timeout: float,
    headers: dict[str, str],
    outputs: Sequence[str],
) -> LoopResult:
    """`concurrency` threads, each with its own tritonclient (geventhttpclient is per thread), sending
    `groups` in turn until `duration` s after the warm-up and asking for `outputs`."""
    name, declared, known = model_io(url, task, headers)
    missing = set(outputs) - set(known)
    assert not missing, f"model {task} has no outputs {sorted(missing)} (it has {known})"
    n = len(groups[0])
    lock = threading.Lock()
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    t_start = time.perf_counter() + warmup
    t_end = t_start + duration
    barrier = threading.Barrier(concurrency)

    def worker(k: int) -> None:
        client = tc.InferenceServerClient(
            hostport(url), concurrency=1, connection_timeout=timeout, network_timeout=timeout
        )
        inputs = []
        try:
            for group in groups:
                inp = tc.InferInput(name, batch_shape(declared, n), "BYTES")
                inp.set_data_from_numpy(
                    np.array(group, dtype=np.object_).reshape(inp.shape()), binary_data=True
                )
                inputs.append(inp)
        except BaseException:
            barrier.abort()  # the other threads stop waiting (BrokenBarrierError) instead of hanging
            client.close()
            raise
        wanted = [tc.InferRequestedOutput(o, binary_data=True) for o in outputs]
        mine: list[float] = []
        bad: Counter[str] = Counter()
        barrier.wait()
        i = k
        try:
            while (t0 := time.perf_counter()) < t_end:
                try:
                    # A copy per call: tritonclient writes Inference-Header-Content-Length into the
                    # dict it is given, and the threads would race on a shared one.
                    result = client.infer(
                        task, [inputs[i % len(inputs)]], outputs=wanted, headers=dict(headers)
                    )
                    answered = result.as_numpy(outputs[0])
                    if answered is None or answered.shape[0] != n:
                        raise ValueError(f"{outputs[0]}: not one answer per image")
                except InferenceServerException as e:
                    if t0 >= t_start:
                        bad[f"status {e.status()}"] += 1
                except Exception as e:  # a broken connection or answer: counted, the loop goes on
                    if t0 >= t_start:
                        bad[type(e).__name__] += 1
                else:
                    if t0 >= t_start and (done := time.perf_counter()) <= t_end:
                        mine.append(done - t0)
                i += concurrency
        finally:
            client.close()
            with lock:
                latencies.extend(mine)
                errors.update(bad)

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(concurrency)]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(warmup + duration + timeout + 10)
    cpu = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    return summarize("v2 tritonclient", n, concurrency, duration, latencies, errors, cpu)


def v1_loop(
    url: str,
    task: str,
    groups: Sequence[Sequence[bytes]],
    *,
    concurrency: int,
    duration: float,
    warmup: float,
    timeout: float,
) -> LoopResult:
    """The same closed loop over /v1 classify with benchmarks.load's HTTP client (raw asyncio streams,
    ~0.1 ms of client CPU per request). It sends no API key: for a server in open mode (the one this
    script starts)."""
    from benchmarks.loadgen import RawClient, multipart

    n = len(groups[0])
    bodies = [
        (g[0], "image/jpeg") if n == 1 else multipart(list(g), "vpt-bench") for g in groups
    ]  # (body, content type)

    async def run() -> tuple[list[float], Counter[str]]:
        http = RawClient(url, timeout)
        latencies: list[float] = []
        errors: Counter[str] = Counter()
        loop = asyncio.get_running_loop()
        t_start = loop.time() + warmup
        t_end = t_start + duration

        async def client(k: int) -> None:
            i = k
            while (t0 := loop.time()) < t_end:
                body, ctype = bodies[i % len(bodies)]
                i += concurrency
                try:
                    status, data = await http.post(f"/v1/tasks/{task}/classify", body, ctype)
                except (asyncio.TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as e:
                    if t0 >= t_start:
                        errors[type(e).__name__] += 1
                    continue
                if t0 < t_start:
                    continue
                if status != 200:
                    errors[f"status {status}"] += 1
                elif len(json.loads(data)["predictions"]) != n:
                    errors["not one answer per image"] += 1
                elif (done := loop.time()) <= t_end:
                    latencies.append(done - t0)

        try:
            await asyncio.gather(*(client(k) for k in range(concurrency)))
        finally:
            await http.aclose()
        return latencies, errors

    cpu0, wall0 = time.process_time(), time.perf_counter()
    latencies, errors = asyncio.run(run())
    cpu = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    return summarize("v1 loadgen", n, concurrency, duration, latencies, errors, cpu)


def summarize(
    api: str,
    n: int,
    concurrency: int,
    duration: float,
    latencies: list[float],
    errors: Counter[str],
    client_cpu: float = float("nan"),
) -> LoopResult:
    ok = len(latencies)
    return LoopResult(
        api=api,
        images_per_request=n,
        concurrency=concurrency,
        duration_s=duration,
        ok=ok,
        errors=dict(errors),
        img_s=ok * n / duration,
        req_s=ok / duration,
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        mean_ms=(sum(latencies) / ok * 1000) if ok else float("nan"),
        client_cpu=client_cpu,
    )


# --- perf_analyzer ---------------------------------------------------------------------------------------------
def serialize_bytes(elements: Sequence[bytes]) -> bytes:
    """A BYTES tensor's raw form: each element as a 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def perf_analyzer_loop(
    url: str,
    task: str,
    groups: Sequence[Sequence[bytes]],
    *,
    concurrency: int,
    duration: float,
    headers: dict[str, str],
    work: Path,
) -> LoopResult:
    """Triton's perf_analyzer at one concurrency, fed the same JPEGs (its --input-data JSON, raw tensor
    bytes as base64), reading the model's shape from /v2/models/<task>/config as it does."""
    name, declared, _ = model_io(url, task, headers)
    n = len(groups[0])
    config = httpx.get(f"{url}/v2/models/{task}/config", headers=headers, timeout=10).json()
    # max_batch_size > 0: perf_analyzer's -b n sends n copies of one sample shaped as the config's dims
    # (batch dimension left out); else each sample is a whole request of n images.
    batched = int(config.get("max_batch_size", 0)) > 0
    if batched:
        dims = next(i["dims"] for i in config["input"] if i["name"] == name)
        samples = [([g[0]], [int(d) for d in dims]) for g in groups]
    else:
        samples = [(list(g), batch_shape(declared, n)) for g in groups]
    data = {"data": [{name: {"b64": base64.b64encode(serialize_bytes(s)).decode(), "shape": shape}}
                     for s, shape in samples]}  # fmt: skip
    (work / "input.json").write_text(json.dumps(data))
    out = work / f"pa-{n}-{concurrency}.csv"
    cmd = ["perf_analyzer", "-m", task, "-u", hostport(url), "-i", "http",
           "--input-data", str(work / "input.json"), "--concurrency-range", f"{concurrency}:{concurrency}",
           "--measurement-interval", str(int(duration * 1000)), "--max-trials", "3",
           "--stability-percentage", "100", "-f", str(out)]  # fmt: skip
    if batched:
        cmd += ["-b", str(n)]
    for k, v in headers.items():
        cmd += ["-H", f"{k}:{v}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=duration * 10 + 60)
    if r.returncode != 0 or not out.exists():
        raise RuntimeError(f"perf_analyzer failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    (row,) = list(csv.DictReader(out.open()))
    infer_s = float(row["Inferences/Second"])  # requests/s (with -b: images/s)
    req_s = infer_s / n if batched else infer_s
    return LoopResult(
        api="v2 perf_analyzer",
        images_per_request=n,
        concurrency=concurrency,
        duration_s=duration,
        ok=-1,  # perf_analyzer reports rates, not counts
        errors={},
        img_s=req_s * n,
        req_s=req_s,
        p50_ms=float(row["p50 latency"]) / 1000,  # microseconds
        p99_ms=float(row["p99 latency"]) / 1000,
        mean_ms=float("nan"),
        client_cpu=float("nan"),  # another process
    )


# --- a server of our own ------------------------------------------------------------------------------------------
def start_own_server(args: argparse.Namespace, work: Path) -> tuple[Any, str]:
    """vpt-serve on 127.0.0.1 in open mode (no keys), one task uploaded; (the server, the task id)."""
    import torch

    from benchmarks.common import make_artifact
    from benchmarks.load import Server, free_port
    from prompt_store.artifact import save_artifact
    from vpt.hub import load_backbone

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VPT_")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    if args.server_threads:
        env["OMP_NUM_THREADS"] = str(args.server_threads)  # as benchmarks.load: torch's intra-op threads
    env.update(
        {
            "VPT_HOST": "127.0.0.1",
            "VPT_PORT": str(port),
            "VPT_STORE": str(work / "store"),
            "VPT_OPEN_MODE": "true",  # no API keys: loopback only
            "VPT_TENANTS_FILE": str(work / "tenants.toml"),
            "VPT_BACKBONE": args.spec,
            "VPT_DEVICE": args.device,
            "VPT_LOG_LEVEL": "warning",
            "VPT_ACCESS_LOG": "false",
            "VPT_REQUEST_TIMEOUT_S": str(args.timeout),
        }
    )
    server = Server("vpt-serve", [sys.executable, "-m", "server"], env, port, work / "server.log")
    server.wait_ready(args.start_timeout)
    backbone = load_backbone(args.spec)
    gpu = args.device.startswith("cuda")
    artifact = make_artifact(backbone, prompt_length=10, mode="deep", num_classes=10, seed=0,
                             dtype=torch.bfloat16 if gpu else torch.float32)  # fmt: skip
    r = httpx.put(f"{server.url}/v1/tasks/bench", content=save_artifact(artifact),
                  headers={"content-type": "application/octet-stream"}, timeout=60)  # fmt: skip
    r.raise_for_status()
    return server, "bench"


def encode_jpegs(n: int, px: int) -> list[bytes]:
    from benchmarks.load import encode_images  # smooth noise: JPEG sizes like photos

    return encode_images(n, px, "jpeg", 0)


# --- main ---------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.triton_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="a running server; without it, start vpt-serve on 127.0.0.1")
    p.add_argument("--task", default=None, help="the task (v2 model) to load; required with --url")
    p.add_argument("--api-key", default=os.environ.get("VPT_API_KEY"), help="sent as a Bearer token")
    p.add_argument("--concurrency", default="1,4,16", help="comma list of requests outstanding")
    p.add_argument("--images-per-request", default="1,8", help="comma list of JPEGs per request")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per point")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each point")
    p.add_argument("--timeout", type=float, default=30.0, help="client timeout per request (s)")
    p.add_argument("--image-px", type=int, default=256, help="side of the JPEGs")
    p.add_argument("--images", type=int, default=16, help="distinct JPEGs sent in turn")
    p.add_argument("--v1", choices=("auto", "on", "off"), default="auto",
                   help="also run the loop over /v1 classify (benchmarks.load's client; no key): auto = "
                        "when this script started the server")  # fmt: skip
    p.add_argument("--outputs", default="top_labels,top_scores",
                   help="outputs asked for (default: what /v1 classify answers; perf_analyzer asks for all)")  # fmt: skip
    p.add_argument("--perf-analyzer", action="store_true", help="measure with Triton's perf_analyzer")
    # For the server this script starts:
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default=None, help="random-weight preset (default vit_test_tiny on CPU, "
                   "vit_base_patch16_224 on GPU)")  # fmt: skip
    p.add_argument("--server-threads", type=int, default=-1,
                   help="OMP_NUM_THREADS of the server, as benchmarks.load (default 1 on CPU, 0 on GPU)")  # fmt: skip
    p.add_argument("--start-timeout", type=float, default=180.0)
    p.add_argument("--json", default="benchmarks/results/triton_load.json")
    args = p.parse_args(argv)
    if args.url and not args.task:
        p.error("--url needs --task (the v2 model name)")
    if args.perf_analyzer and shutil.which("perf_analyzer") is None:
        p.error("--perf-analyzer: no perf_analyzer on PATH (Triton's SDK image has it)")
    gpu = args.device.startswith("cuda")
    args.preset = args.preset or ("vit_base_patch16_224" if gpu else "vit_test_tiny")
    args.spec = f"random:{args.preset}@0"
    if args.server_threads < 0:
        args.server_threads = 0 if gpu else 1
    args.concurrency = [int(x) for x in args.concurrency.split(",")]
    args.images_per_request = [int(x) for x in args.images_per_request.split(",")]
    args.outputs = [x for x in args.outputs.split(",") if x]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    jpegs = encode_jpegs(args.images, args.image_px)
    work = Path(tempfile.mkdtemp(prefix="vpt-triton-load-"))
    server = None
    try:
        if args.url:
            url, task = args.url.rstrip("/"), args.task
        else:
            server, task = start_own_server(args, work)
            url = server.url
        ready = httpx.get(f"{url}/v2/health/ready", headers=headers, timeout=10)
        assert ready.status_code == 200, f"{url}/v2/health/ready: {ready.status_code} {ready.text[:200]}"
        try:
            model_io(url, task, headers)  # a refused key or an unknown task: one line, before any load
        except InferenceServerException as e:
            print(f"{url}: model {task}: status {e.status()}: {e.message()}", file=sys.stderr)
            return 2
        with_v1 = args.v1 == "on" or (args.v1 == "auto" and server is not None)
        print(
            f"# triton_load: {url} task {task}, {args.image_px}px JPEG (~{np.median([len(j) for j in jpegs]) / 1e3:.1f} kB), "
            f"{args.duration:g}s per point, {'perf_analyzer' if args.perf_analyzer else 'tritonclient'}"
            f"{' and /v1 (benchmarks.load client)' if with_v1 else ''}, load avg {os.getloadavg()[0]:.1f}",
            flush=True,
        )  # fmt: skip
        results: list[LoopResult] = []
        for n in args.images_per_request:
            groups = [[jpegs[(i + j) % len(jpegs)] for j in range(n)] for i in range(len(jpegs))]
            for c in args.concurrency:
                # v2 then v1 at each point, so drift of a shared machine hits both alike.
                if args.perf_analyzer:
                    r = perf_analyzer_loop(url, task, groups, concurrency=c, duration=args.duration,
                                           headers=headers, work=work)  # fmt: skip
                else:
                    r = triton_loop(url, task, groups, concurrency=c, duration=args.duration,
                                    warmup=args.warmup, timeout=args.timeout, headers=headers,
                                    outputs=args.outputs)  # fmt: skip
                rows = [r]
                if with_v1:
                    rows.append(v1_loop(url, task, groups, concurrency=c, duration=args.duration,
                                        warmup=args.warmup, timeout=args.timeout))  # fmt: skip
                for r in rows:
                    print(
                        f"  {r.api:>16} {n} img/req x{c:<3}: {r.img_s:8.1f} img/s, p50 {r.p50_ms:7.1f} "
                        f"p99 {r.p99_ms:7.1f} ms, errors {sum(r.errors.values())}, client cpu {r.client_cpu:.2f}",
                        flush=True,
                    )
                results.extend(rows)
                if server is not None and server.proc.poll() is not None:
                    raise RuntimeError(f"vpt-serve died:\n{server.tail()}")
    except BaseException:
        if server is not None:
            print(f"--- vpt-serve log tail ---\n{server.tail()}", file=sys.stderr)
        raise
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)

    rows = [dataclasses.asdict(r) | {"errors": sum(r.errors.values())} for r in results]
    print(format_table(rows,
                       ["api", "images_per_request", "concurrency", "img_s", "req_s", "p50_ms", "p99_ms", "errors", "client_cpu"],
                       "closed loop (concurrency = requests outstanding)"))  # fmt: skip
    write_json(args.json, {
        "benchmark": "triton_load",
        "config": {k: v for k, v in vars(args).items() if k != "api_key"},
        "points": [dataclasses.asdict(r) for r in results],
    })  # fmt: skip
    print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
