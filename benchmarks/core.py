"""The engine core's own cost per image, without HTTP: driver processes speak the API servers' protocol
to one engine-core process, each through a `CoreClient` and an image arena (the code an API server
runs after decoding), in closed loops of one-image requests.

The core (scheduler, residency, protocol) must keep up with every API server at once: its CPU per
image is what bounds a server with many API servers, whatever the device. Read from /proc per process
(`benchmarks.loadgen.proc_cpu_by_role`): the core apart from its engine process, and the drivers (the
API servers' share of the protocol: arena copy, frames, answers).

    .venv/bin/python -m benchmarks.core                       # vit_test_tiny, 2 drivers x 16 in flight
    .venv/bin/python -m benchmarks.core --drivers 1,2 --duration 5
    .venv/bin/python -m benchmarks.core --quick               # smoke (seconds)
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from benchmarks.common import format_table, int_list, machine_info, make_artifact, write_json
from benchmarks.loadgen import proc_cpu_by_role, proc_cpu_seconds
from prompt_store.artifact import save_artifact
from prompt_store.url import open_store
from vpt.hub import load_backbone

_spawn = multiprocessing.get_context("spawn")


def _drive(
    address: Any, tasks: list[str], img_size: int, concurrency: int, seconds: float, out: Connection
) -> None:
    """One driver process: `concurrency` loops of admit + run, one image each, for `seconds`."""
    import torch

    from server.core.client import CoreClient
    from server.preprocess import Pixels

    async def main() -> tuple[int, int]:
        client = await CoreClient.connect(address)
        images = Pixels(torch.randint(0, 256, (1, 3, img_size, img_size), dtype=torch.uint8))
        done = failed = 0
        out.send("started")  # measured from here: imports and the connection are behind
        stop = time.monotonic() + seconds

        async def loop(i: int) -> None:
            nonlocal done, failed
            while time.monotonic() < stop:
                task = tasks[(i + done) % len(tasks)]
                try:
                    admission = await client.admit("bench", 1, None)
                    await client.run(
                        admission, task, images, ("classify",), top_k=5, timeout_s=30, weight=1.0
                    )
                    done += 1
                except Exception:
                    failed += 1

        await asyncio.gather(*(loop(i) for i in range(concurrency)))
        await client.stop(0)
        return done, failed

    out.send(asyncio.run(main()))


def run_point(core_pid: int, sock: str, arena_bytes: int, work: Path, tasks: list[str], img_size: int,
              drivers: int, concurrency: int, seconds: float) -> dict[str, Any]:  # fmt: skip
    from server.core.client import CoreAddress

    procs, conns = [], []
    for d in range(drivers):
        parent, child = _spawn.Pipe(duplex=False)
        address = CoreAddress(
            sock, str(work / f"arena-{d}-{time.monotonic_ns()}"), arena_bytes, str(work / "rates")
        )
        p = _spawn.Process(target=_drive, args=(address, tasks, img_size, concurrency, seconds, child))
        p.start()
        procs.append(p)
        conns.append(parent)
    for c in conns:  # each driver has imported torch and connected, and is sending
        assert c.recv() == "started"
    time.sleep(seconds / 4)  # measure the steady middle half
    before, t0 = proc_cpu_by_role(core_pid), time.perf_counter()
    driver_before = [proc_cpu_seconds(p.pid) or 0.0 for p in procs]
    time.sleep(seconds / 2)
    after, wall = proc_cpu_by_role(core_pid), time.perf_counter() - t0
    driver_cpu = sum((proc_cpu_seconds(p.pid) or 0.0) - b for p, b in zip(procs, driver_before, strict=True))
    results = [c.recv() for c in conns]
    for p in procs:
        p.join()
    done = sum(r[0] for r in results)
    failed = sum(r[1] for r in results)
    assert before is not None and after is not None
    used = {k: v - before.get(k, 0.0) for k, v in after.items()}
    # Images in the measured window, from the rate over the whole run (closed loops: steady).
    img = done / seconds * wall
    return {
        "drivers": drivers,
        "in_flight": drivers * concurrency,
        "img_s": done / seconds,
        "failed": failed,
        "core_cpu_ms_per_img": used.get("server", 0.0) / img * 1000,
        "engine_cpu_ms_per_img": used.get("engine", 0.0) / img * 1000,
        "driver_cpu_ms_per_img": driver_cpu / img * 1000,
        "core_cores": used.get("server", 0.0) / wall,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.core", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="vit_test_tiny")
    p.add_argument("--drivers", default="2", help="comma list: driver processes (API servers), in turn")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight per driver")
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--duration", type=float, default=8.0, help="seconds per point")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--json", default="benchmarks/results/core.json")
    p.add_argument("--quick", action="store_true", help="smoke: one 2 s point")
    args = p.parse_args(argv)
    if args.quick:
        args.drivers, args.duration, args.tasks = "1", 2.0, 2
    from server.core.process import CORE_STOP, core_main

    spec = f"random:{args.preset}@0"
    backbone = load_backbone(spec)
    work = Path(
        tempfile.mkdtemp(prefix="vpt-core-bench-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
    )
    store_dir = work / "store"
    store = open_store(str(store_dir))
    tasks = [f"task-{i}" for i in range(args.tasks)]
    for i, task in enumerate(tasks):
        art = make_artifact(backbone, prompt_length=10, mode="deep", num_classes=10, seed=i)
        store.put("bench", task, save_artifact(art))
    store.close()
    overrides = {
        "backbone": spec,
        "store": str(store_dir),
        "max_batch_size": args.max_batch,
        "log_level": "warning",
        "open_mode": True,
    }
    sock = str(work / "core.sock")
    parent, child = _spawn.Pipe(duplex=False)
    core = _spawn.Process(target=core_main, args=(overrides, sock, child))
    core.start()
    rows: list[dict[str, Any]] = []
    try:
        ready = parent.recv()
        assert core.pid is not None and ready.get("ready"), ready
        for d in int_list(args.drivers):
            row = run_point(core.pid, sock, ready["arena_bytes"], work, tasks, backbone.cfg.img_size, d,
                            args.concurrency, args.duration)  # fmt: skip
            rows.append(row)
            print(f"  {d} driver(s): {row['img_s']:8.1f} img/s, core {row['core_cpu_ms_per_img']:.3f} ms CPU/img, "
                  f"engine {row['engine_cpu_ms_per_img']:.3f}, drivers {row['driver_cpu_ms_per_img']:.3f}", flush=True)  # fmt: skip
    finally:
        if core.pid is not None and core.is_alive():
            os.kill(core.pid, CORE_STOP)  # the core's stop signal (it leaves SIGTERM to API servers)
        core.join(30)
        shutil.rmtree(work, ignore_errors=True)
    print(
        format_table(
            rows,
            [
                "drivers",
                "in_flight",
                "img_s",
                "failed",
                "core_cpu_ms_per_img",
                "engine_cpu_ms_per_img",
                "driver_cpu_ms_per_img",
                "core_cores",
            ],
            f"engine core alone, one {backbone.cfg.img_size} px image per request, {spec}, {args.duration:g} s per point",
        )
    )
    best = min(r["core_cpu_ms_per_img"] for r in rows)
    print(
        f"\ncore: {best:.3f} ms CPU per image → at most {1000 / best:,.0f} img/s on the core's one event loop"
    )
    write_json(
        args.json, {"benchmark": "core", "machine": machine_info(), "config": vars(args), "rows": rows}
    )
    print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
