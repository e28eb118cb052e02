"""HTTP load benchmark: open-loop Poisson traffic against live servers it starts itself on 127.0.0.1.

In one run, with the same backbone, tasks, images and arrival schedules, it compares
  (a) `mixed`       vpt-serve, cross-task batching (the default);
  (b) `per_task`    vpt-serve with VPT_BATCHING=per_task (a batch holds one task);
  (c) `no_batching` vpt-serve with VPT_MAX_BATCH_SIZE=1;
  (d) `naive`       benchmarks/naive_server.py: FastAPI, one forward per request, written by hand.
N tasks are uploaded (PUT) and requested with Zipf(s) popularity; every request carries one encoded
image. Per offered rate it records throughput, p50/p95/p99 latency, errors, the batch sizes the server
reached (from the `vpt_batch_size` histogram on /metrics) and the CPU each side used. It then measures the
raw engine in-process at the batch size the mixed server reached (same threads, tasks and popularity),
and the cold load of a task from the local store (benchmarks/cold_load.py). Outputs: tables on stdout,
JSON, and a PNG of throughput and p99 against offered load.

Every server listens on 127.0.0.1 only and is stopped (SIGTERM, then SIGKILL) when its sweep ends;
each point lasts `--duration` s plus at most `--timeout` s of drain.

    .venv/bin/python -m benchmarks.load                 # CPU defaults: ~4-6 min on 2 cores
    .venv/bin/python -m benchmarks.load --quick         # smoke run (~1 min)
    .venv/bin/python -m benchmarks.load --device cuda --preset vit_base_patch16_224 --image-format jpeg
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from PIL import Image

from benchmarks.cold_load import DEFAULT_SIZES, measure_cold_load
from benchmarks.common import (
    format_table,
    machine_info,
    make_artifact,
    median,
    random_images,
    str_list,
    write_json,
    zipf_sample,
    zipf_weights,
)
from benchmarks.engine import build_engine, install_tasks, make_batch, throughput
from benchmarks.loadgen import PointResult, multipart, run_point
from prompt_store.artifact import save_artifact
from prompt_store.local import LocalStore
from server.engine.engine import pick_device, pick_dtype
from vpt.hub import Backbone, load_backbone

CONFIGS = ("mixed", "per_task", "no_batching", "naive")


# --- servers ---------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One server subprocess on 127.0.0.1 with its log in a file."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], port: int, log: Path) -> None:
        self.name, self.port, self.log_path = name, port, log
        self.url = f"http://127.0.0.1:{port}"
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"{self.name} not ready after {timeout}s:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def start_server(config: str, args: argparse.Namespace, work: Path, store: Path) -> Server:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VPT_")}
    if args.server_threads:
        env["OMP_NUM_THREADS"] = str(args.server_threads)  # torch's intra-op threads in that process
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    if config == "naive":
        cmd = [sys.executable, "-m", "benchmarks.naive_server", "--backbone", args.spec, "--store", str(store),
               "--port", str(port), "--device", args.device]  # fmt: skip
    else:
        cmd = [sys.executable, "-m", "server"]
        env.update(
            {
                "VPT_HOST": "127.0.0.1",
                "VPT_PORT": str(port),
                "VPT_STORE": str(store),
                "VPT_OPEN_MODE": "true",  # no API keys: loopback only, every caller is the default tenant
                "VPT_TENANTS_FILE": str(work / "tenants.toml"),
                "VPT_BACKBONE": args.spec,
                "VPT_DEVICE": args.device,
                "VPT_LOG_LEVEL": "warning",
                "VPT_ACCESS_LOG": str(args.access_log).lower(),
                "VPT_MAX_BATCH_SIZE": str(1 if config == "no_batching" else args.max_batch),
                "VPT_BATCHING": "per_task" if config == "per_task" else "mixed",
                "VPT_MAX_PROMPT_LENGTH": str(args.prompt_length),
                "VPT_MAX_CLASSES": str(args.classes),
                "VPT_BANK_SLOTS": str(args.tasks),
                "VPT_MAX_QUEUE_IMAGES": str(args.max_queue),
                "VPT_REQUEST_TIMEOUT_S": str(args.timeout),
            }
        )
        env.update(dict(kv.split("=", 1) for kv in args.server_env))
    server = Server(config, cmd, env, port, work / f"{config}.log")
    server.wait_ready(args.start_timeout)
    return server


# --- traffic -----------------------------------------------------------------------------------------------
def encode_images(n: int, px: int, fmt: str, seed: int) -> list[bytes]:
    """n smooth random images (upsampled noise: JPEG sizes like photos, not like noise), encoded."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        small = torch.randint(0, 256, (1, 3, max(2, px // 8), max(2, px // 8)), generator=g).float()
        img = torch.nn.functional.interpolate(small, size=(px, px), mode="bilinear", align_corners=False)
        arr = img[0].clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        Image.fromarray(arr).save(
            buf, "JPEG" if fmt == "jpeg" else "PNG", **({"quality": 90} if fmt == "jpeg" else {})
        )
        out.append(buf.getvalue())
    return out


def task_artifacts(backbone: Backbone, args: argparse.Namespace) -> dict[str, bytes]:
    return {
        f"task-{i:04d}": save_artifact(
            make_artifact(
                backbone,
                prompt_length=args.prompt_length,
                mode=args.mode,
                num_classes=args.classes,
                seed=i,
                dtype=args.artifact_dtype,
            )
        )
        for i in range(args.tasks)
    }


async def upload_and_warm(
    server: Server, artifacts: dict[str, bytes], body: bytes, ctype: str, upload: bool
) -> float:
    """PUT every task (vpt-serve), then classify once per task so all are resident before timing."""
    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
        if upload:
            for task_id, data in artifacts.items():
                r = await c.put(
                    f"/v1/tasks/{task_id}", content=data, headers={"content-type": "application/octet-stream"}
                )
                r.raise_for_status()
        upload_s = time.perf_counter() - t0
        sem = asyncio.Semaphore(16)

        async def one(task_id: str) -> None:
            async with sem:
                r = await c.post(
                    f"/v1/tasks/{task_id}/classify", content=body, headers={"content-type": ctype}
                )
                r.raise_for_status()

        await asyncio.gather(*(one(t) for t in artifacts))
        await asyncio.gather(*(one(t) for t in list(artifacts)[:64]))  # a burst: warms batch shapes
    return upload_s


def sweep(
    servers: dict[str, Server], args: argparse.Namespace, tasks: list[str], bodies: list[bytes], ctype: str
) -> dict[str, list[PointResult]]:
    """Rates ascending; at each rate every configuration in turn, so drift of a shared machine (other
    jobs starting and stopping) hits all configurations alike instead of whichever ran last."""
    weights = zipf_weights(len(tasks), args.zipf_s)
    results: dict[str, list[PointResult]] = {name: [] for name in servers}
    saturated = dict.fromkeys(servers, 0)
    for i, rate in enumerate(args.rates):
        for name, server in servers.items():
            # Past saturation the curve is flat: one more point shows the plateau, the rest would only
            # add queueing time to the run.
            if saturated[name] >= args.stop_after_saturated:
                continue
            p = asyncio.run(
                run_point(
                    server.url,
                    rate=rate,
                    duration=args.duration,
                    tasks=tasks,
                    weights=weights,
                    bodies=bodies,
                    content_type=ctype,
                    timeout=args.timeout,
                    max_outstanding=args.max_outstanding,
                    seed=i,
                    server_pid=server.proc.pid,
                    metrics=name != "naive",
                    client=args.client,
                    images_per_request=args.images_per_request,
                )
            )
            results[name].append(p)
            b = p.batches
            print(
                f"  {name:>11} offered {rate:7.1f} rps: {p.throughput_rps:7.1f} ok/s "
                f"({p.throughput_img_s:.0f} img/s), p50 {p.p50_ms:7.1f} "
                f"p99 {p.p99_ms:7.1f} ms, errors {sum(p.errors.values())}, mean batch "
                f"{b.get('mean_batch', float('nan')):.1f}, cpu server {p.server_cpu or 0:.2f} "
                f"generator {p.client_cpu:.2f}",
                flush=True,
            )
            if server.proc.poll() is not None:
                raise RuntimeError(f"{name} died:\n{server.tail()}")
            saturated[name] = saturated[name] + 1 if p.throughput_rps < 0.8 * rate else 0
    return results


# --- raw engine at the server's batch size ---------------------------------------------------------------------
def raw_engine(args: argparse.Namespace, batch_sizes: list[int]) -> list[dict[str, Any]]:
    """In-process Engine.run img/s on Zipf-popular mixed batches: the ceiling HTTP is compared against."""
    if args.server_threads:
        torch.set_num_threads(args.server_threads)
    device = pick_device(args.device)
    backbone, engine = build_engine(
        args.spec,
        device=device,
        dtype=pick_dtype("auto", device),  # what vpt-serve's VPT_DTYPE=auto picks
        bank_slots=args.tasks,
        max_prompt_length=args.prompt_length,
        max_classes=args.classes,
    )
    engine.warmup((1, 8))
    slots = install_tasks(
        engine, backbone, n=args.tasks, prompt_length=args.prompt_length, mode=args.mode,
        num_classes=args.classes, tag="raw",
    )  # fmt: skip
    rng = random.Random(0)
    images = random_images(max(batch_sizes), backbone.cfg.img_size, 0)
    rows = []
    for B in sorted(set(batch_sizes)):
        picks = [slots[t] for t in zipf_sample(len(slots), args.zipf_s, B, rng)]
        r = throughput(engine, make_batch(engine, images[:B], picks), min_time=args.engine_min_time)
        rows.append({"batch": B, **r})
    return rows


# --- reporting ---------------------------------------------------------------------------------------------
def best(points: list[PointResult]) -> PointResult:
    return max(points, key=lambda p: p.throughput_img_s)


def summarize(
    results: dict[str, list[PointResult]], engine_rows: list[dict[str, Any]], mean_batch: float
) -> dict[str, Any]:
    """Ratios the targets are stated in (throughputs are each configuration's best point)."""
    peak = {c: best(ps).throughput_img_s for c, ps in results.items() if ps}
    s: dict[str, Any] = {"peak_img_s": peak}
    # Latency under light load: the p50 of each configuration's lowest offered rate.
    s["light_load_p50_ms"] = {
        c: {"offered_rps": lo.offered_rps, "p50_ms": lo.p50_ms}
        for c, ps in results.items()
        if ps
        for lo in [min(ps, key=lambda p: p.offered_rps)]
    }
    if "mixed" in peak:
        for other in ("per_task", "no_batching", "naive"):
            if other in peak:
                s[f"mixed_vs_{other}"] = peak["mixed"] / peak[other]
        at = {r["batch"]: r["img_s"] for r in engine_rows}
        b = round(mean_batch)
        if b in at:
            s["raw_engine_img_s_at_batch"] = {"batch": b, "img_s": at[b]}
            s["http_vs_raw_engine"] = peak["mixed"] / at[b]
        if at:
            s["http_vs_raw_engine_max_batch"] = peak["mixed"] / at[max(at)]
        # The same comparison in CPU per image, steadier than wall time on a shared machine: the part of
        # the server's CPU that is the engine's work (1.0 = HTTP, decoding and scheduling cost nothing).
        m = best(results["mixed"])
        cpu = {r["batch"]: r.get("cpu_ms_per_img") for r in engine_rows}
        if m.server_cpu and m.throughput_img_s and cpu.get(b):
            srv = m.server_cpu / m.throughput_img_s * 1000
            s["server_cpu_ms_per_img"] = srv
            s["engine_cpu_ms_per_img"] = cpu[b]
            s["engine_share_of_server_cpu"] = cpu[b] / srv
    return s


def plot(results: dict[str, list[PointResult]], engine_img_s: float | None, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), dpi=90)
    for name, ps in results.items():
        x = [p.offered_rps for p in ps]
        ax1.plot(x, [p.throughput_img_s for p in ps], marker="o", label=name)
        ax2.plot(x, [p.p99_ms for p in ps], marker="o", label=name)
    if engine_img_s:
        ax1.axhline(engine_img_s, ls="--", c="grey", label="raw engine")
    lim = max((p.offered_rps for ps in results.values() for p in ps), default=1)
    k = next((p.images_per_request for ps in results.values() for p in ps), 1)
    ax1.plot([0, lim], [0, lim * k], ls=":", c="lightgrey", label="offered")
    ax1.set(xlabel="offered load (req/s)", ylabel="throughput (img/s)", title="throughput")
    ax2.set(xlabel="offered load (req/s)", ylabel="p99 latency (ms)", yscale="log", title="p99 latency")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def point_rows(results: dict[str, list[PointResult]]) -> list[dict[str, Any]]:
    rows = []
    for name, ps in results.items():
        for p in ps:
            b = p.batches
            rows.append(
                {
                    "config": name,
                    "offered": p.offered_rps,
                    "rps": p.throughput_rps,
                    "img_s": p.throughput_img_s,
                    "p50_ms": p.p50_ms,
                    "p95_ms": p.p95_ms,
                    "p99_ms": p.p99_ms,
                    "errors": sum(p.errors.values()),
                    "mean_batch": b.get("mean_batch", 1.0 if name != "naive" or p.ok else None),
                    "tasks_per_batch": b.get("mean_tasks_per_batch"),
                    "engine_busy": b.get("engine_busy"),
                    "srv_cpu": p.server_cpu,
                    # server CPU per image: comparable with the raw engine's cpu_ms_per_img
                    "srv_cpu_ms_img": (p.server_cpu / p.throughput_img_s * 1000)
                    if p.server_cpu and p.throughput_img_s
                    else None,
                    "gen_cpu": p.client_cpu,
                }
            )
    return rows


# --- main ------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--preset",
        default=None,
        help="random-weight preset; default vit_test_small (CPU), vit_base_patch16_224 (GPU)",
    )
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    p.add_argument("--tasks", type=int, default=100)
    p.add_argument("--zipf-s", type=float, default=1.1)
    p.add_argument("--mode", default="deep")
    p.add_argument("--prompt-length", type=int, default=10)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--artifact-dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="dtype of the uploaded tasks (auto: bfloat16 on GPU, float32 on CPU)")  # fmt: skip
    p.add_argument("--max-batch", type=int, default=64, help="VPT_MAX_BATCH_SIZE of mixed and per_task")
    p.add_argument("--rates", default=None, help="offered req/s, comma list (default by device)")
    p.add_argument("--duration", type=float, default=4.0, help="seconds of arrivals per point")
    p.add_argument(
        "--timeout", type=float, default=5.0, help="client timeout and server request deadline (s)"
    )
    p.add_argument("--max-outstanding", type=int, default=256, help="client-side cap on requests in flight")
    p.add_argument("--max-queue", type=int, default=4096, help="VPT_MAX_QUEUE_IMAGES")
    p.add_argument(
        "--stop-after-saturated", type=int, default=2, help="stop a sweep after this many saturated points"
    )
    p.add_argument("--server-threads", type=int, default=-1,
                   help="OMP_NUM_THREADS (torch intra-op threads) of the servers and the raw engine; "
                        "0 = library default; default 1 on CPU (see docs/benchmarks.md), 0 on GPU")  # fmt: skip
    p.add_argument(
        "--server-env", action="append", default=[], metavar="VPT_X=V", help="extra vpt-serve setting"
    )
    p.add_argument(
        "--access-log", action="store_true", help="keep vpt-serve's JSON access log on (default off)"
    )
    p.add_argument("--client", choices=("raw", "httpx"), default="raw",
                   help="hot-path HTTP client: raw asyncio streams (~0.1 ms CPU/request) or httpx (~3 ms here)")  # fmt: skip
    p.add_argument("--images", type=int, default=32, help="distinct encoded images sent in turn")
    p.add_argument(
        "--image-px",
        type=int,
        default=0,
        help="side of the sent images (default: the backbone's resize size)",
    )
    p.add_argument("--images-per-request", type=int, default=1,
                   help="images per request (>1: multipart; not supported by the naive baseline)")  # fmt: skip
    p.add_argument("--image-format", choices=("png", "jpeg"), default="png")
    p.add_argument("--engine-min-time", type=float, default=1.0)
    p.add_argument(
        "--cold-preset", default="vit_base_patch16_224", help="backbone for the cold-load sizes, or 'none'"
    )
    p.add_argument("--cold-reps", type=int, default=10)
    p.add_argument("--start-timeout", type=float, default=180.0)
    p.add_argument("--json", default="benchmarks/results/load.json")
    p.add_argument("--plot", default="benchmarks/results/load.png")
    p.add_argument("--keep", action="store_true", help="keep the work directory (server logs, stores)")
    p.add_argument("--quick", action="store_true", help="smoke sizes (about a minute)")
    args = p.parse_args(argv)
    gpu = pick_device(args.device).type == "cuda"
    args.preset = args.preset or ("vit_base_patch16_224" if gpu else "vit_test_small")
    args.artifact_dtype = {"auto": torch.bfloat16 if gpu else torch.float32, "float32": torch.float32,
                           "bfloat16": torch.bfloat16}[args.artifact_dtype]  # fmt: skip
    if args.server_threads < 0:
        args.server_threads = 0 if gpu else 1
    if args.quick:
        args.preset, args.tasks, args.duration, args.timeout = "vit_test_tiny", 8, 1.0, 3.0
        args.rates = args.rates or "20,60"
        args.engine_min_time, args.cold_reps, args.images = 0.2, 1, 4
        args.cold_sizes = [("deep", 4, 10, "float32")]
        args.cold_preset = "vit_test_tiny" if args.cold_preset == "vit_base_patch16_224" else args.cold_preset
    else:
        args.cold_sizes = DEFAULT_SIZES
    args.rates = [
        float(x)
        for x in (args.rates or ("250,1000,2500,5000,8000" if gpu else "25,50,100,150,200,300")).split(",")
    ]
    args.configs = str_list(args.configs)
    if args.images_per_request > 1 and "naive" in args.configs:
        p.error("the naive baseline takes one image per request: drop it from --configs")
    unknown = set(args.configs) - set(CONFIGS)
    if unknown:
        p.error(f"unknown configs {sorted(unknown)}")
    args.spec = f"random:{args.preset}@0"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    backbone = load_backbone(args.spec)  # host copy: fingerprint for the artifacts, image size
    cfg = backbone.cfg
    artifacts = task_artifacts(backbone, args)
    px = args.image_px or cfg.resize_size
    bodies = encode_images(args.images, px, args.image_format, 0)
    ctype = "image/jpeg" if args.image_format == "jpeg" else "image/png"
    if args.images_per_request > 1:
        k = args.images_per_request
        pairs = [
            multipart([bodies[(i + j) % len(bodies)] for j in range(k)], "vpt-bench")
            for i in range(len(bodies))
        ]
        bodies, ctype = [b for b, _ in pairs], pairs[0][1]
    art_kb = median([len(a) for a in artifacts.values()]) / 1e3
    print(
        f"# load benchmark: {args.spec} (D={cfg.embed_dim}, depth {cfg.depth}, {cfg.img_size}px) on {args.device}, "
        f"{args.tasks} tasks {args.mode} P={args.prompt_length} C={args.classes} ({art_kb:.0f} kB each), "
        f"Zipf({args.zipf_s}), {px}px {args.image_format} (~{median([len(b) for b in bodies]) / 1e3:.1f} kB), "
        f"{args.duration:g}s per point, server threads {args.server_threads or 'default'}, "
        f"load avg {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    work = Path(tempfile.mkdtemp(prefix="vpt-load-"))
    naive_store = work / "store-naive"
    if "naive" in args.configs:
        store = LocalStore(naive_store)
        for task_id, data in artifacts.items():
            store.put("default", task_id, data)
    setup: dict[str, dict[str, float]] = {}
    servers: dict[str, Server] = {}
    try:
        # All servers up at once (idle ones use no CPU), so the sweep can interleave them.
        for config in args.configs:
            t0 = time.perf_counter()
            store = naive_store if config == "naive" else work / f"store-{config}"
            servers[config] = server = start_server(config, args, work, store)
            started = time.perf_counter() - t0
            upload_s = asyncio.run(
                upload_and_warm(server, artifacts, bodies[0], ctype, upload=config != "naive")
            )
            setup[config] = {"start_s": started, "upload_s": upload_s}
        results = sweep(servers, args, list(artifacts), bodies, ctype)
    except BaseException:
        for name, server in servers.items():
            print(f"--- {name} log tail ---\n{server.tail()}", file=sys.stderr)
        raise
    finally:
        for server in servers.values():
            server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work directory kept: {work}")

    mean_batch = 1.0
    if results.get("mixed"):
        mean_batch = best(results["mixed"]).batches.get("mean_batch", 1.0) or 1.0
    engine_rows = raw_engine(args, [max(1, round(mean_batch)), args.max_batch])
    summary = summarize(results, engine_rows, mean_batch)
    cold: list[dict[str, Any]] = []
    if args.cold_preset != "none":
        cold_bb = load_backbone(f"random:{args.cold_preset}@0")
        cold = measure_cold_load(cold_bb, args.cold_sizes, reps=args.cold_reps)
        summary["cold_load_ms_per_MB_max"] = max(r["ms_per_MB"] for r in cold)
        summary["cold_load_best_ms_per_MB_max"] = max(r["best_ms_per_MB"] for r in cold)

    print(format_table(point_rows(results), ["config", "offered", "rps", "img_s", "p50_ms", "p95_ms", "p99_ms", "errors",
                                             "mean_batch", "tasks_per_batch", "engine_busy", "srv_cpu", "srv_cpu_ms_img", "gen_cpu"],
                       "open-loop sweep (1 image per request; rps = 200 responses per second)"))  # fmt: skip
    print(
        format_table(
            engine_rows,
            ["batch", "img_s", "ms_per_batch", "cpu_ms_per_img"],
            "raw engine, in-process (Zipf mixed batches)",
        )
    )
    if cold:
        print(format_table(cold, list(cold[0]), f"cold load from the local store ({args.cold_preset})"))
    print("\n### targets (ratios from this run)\n")
    checks = [
        ("HTTP / raw engine at the same batch", summary.get("http_vs_raw_engine"), 0.8),
        ("mixed / per-task batching (HTTP)", summary.get("mixed_vs_per_task"), 3.0),
        ("mixed / naive endpoint", summary.get("mixed_vs_naive"), 3.0),
    ]
    if "engine_share_of_server_cpu" in summary:
        print(
            f"- (CPU accounting) server {summary['server_cpu_ms_per_img']:.2f} ms CPU per image at the mixed "
            f"peak, of which engine {summary['engine_cpu_ms_per_img']:.2f} "
            f"({summary['engine_share_of_server_cpu']:.0%})"
        )
    for label, value, target in checks:
        if value is not None:
            print(f"- {label}: {value:.2f} (target >= {target:g}) {'MET' if value >= target else 'MISSED'}")
    if "cold_load_ms_per_MB_max" in summary:
        v = summary["cold_load_ms_per_MB_max"]
        b = summary["cold_load_best_ms_per_MB_max"]
        print(
            f"- cold load, worst artifact: {v:.2f} ms/MB median, {b:.2f} best-of-reps (target <= 2) "
            f"{'MET' if v <= 2 else 'MISSED'}"
        )
    summary["mixed_mean_batch_at_peak"] = mean_batch
    out = {
        "benchmark": "load",
        "machine": machine_info(pick_device(args.device)),
        "config": {k: v for k, v in vars(args).items() if k != "cold_sizes"}
        | {"cold_sizes": args.cold_sizes},
        "setup": setup,
        "points": {c: [dataclasses.asdict(p) for p in ps] for c, ps in results.items()},
        "raw_engine": engine_rows,
        "cold_load": cold,
        "summary": summary,
        "wall_s": time.perf_counter() - t_start,
    }
    write_json(args.json, out)
    if args.plot and args.plot != "none":
        at = {r["batch"]: r["img_s"] for r in engine_rows}
        plot(results, at.get(round(mean_batch)), Path(args.plot),
             f"{args.spec}, {args.tasks} tasks Zipf({args.zipf_s}), {args.mode} P={args.prompt_length}, "
             f"{args.device}, {os.cpu_count()} CPUs")  # fmt: skip
        print(f"plot: {args.plot}")
    print(f"results: {args.json} ({time.perf_counter() - t_start:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
