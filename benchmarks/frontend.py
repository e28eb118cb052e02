"""Front-end cost per image, measured from outside: `hey` (a closed-loop HTTP load tool from Debian,
`apt-get install hey`) sends one JPEG per multipart request to a live vpt-serve on 127.0.0.1.

The server's CPU is read from /proc per process while the load runs: the server process (HTTP, auth,
multipart, decoding, scheduling, the response) and its engine process (the forward passes; CPU
engines compute there by default). Their split is the front end's CPU per image with the engine's cost
taken out — no model of either needed — and the front end's capacity per process follows from it:
1000 / (front-end ms per image) images per second for each core one such process may use.

    .venv/bin/python -m benchmarks.frontend                      # vit_test_tiny, 16 connections, 10 s
    .venv/bin/python -m benchmarks.frontend --connections 1,16 --duration 5
    .venv/bin/python -m benchmarks.frontend --quick              # smoke (seconds)
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import format_table, int_list, machine_info, write_json
from benchmarks.load import encode_images, start_server, task_artifacts, upload_and_warm
from benchmarks.load import parse_args as load_args
from benchmarks.loadgen import multipart, proc_cpu_by_role
from vpt.hub import load_backbone


def run_hey(url: str, body: Path, ctype: str, connections: int, duration: float) -> dict[str, Any]:
    """One closed-loop run of `hey` for `duration` seconds (`parse_hey`)."""
    cmd = [
        "hey",
        "-z",
        f"{duration}s",
        "-c",
        str(connections),
        "-m",
        "POST",
        "-T",
        ctype,
        "-D",
        str(body),
        url,
    ]
    return parse_hey(
        subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, check=True).stdout
    )


def parse_hey(out: str) -> dict[str, Any]:
    """hey's report → requests/s (failed ones included, as hey counts them), responses by status code,
    failed requests (connection errors: no status), p50 and p99 in ms (None when hey gives none)."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if rps is None:
        raise RuntimeError(f"cannot read hey's output:\n{out}")
    codes = {int(c): int(n) for c, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", out)}
    errors_at = out.find("Error distribution:")
    errors = (
        sum(int(n) for n in re.findall(r"^\s*\[(\d+)\]\t", out[errors_at:], re.M)) if errors_at >= 0 else 0
    )
    p50 = re.search(r"\b50% in ([\d.]+) secs", out)
    p99 = re.search(r"\b99% in ([\d.]+) secs", out)
    return {
        "rps": float(rps.group(1)),
        "codes": codes,
        "errors": errors,
        "p50_ms": float(p50.group(1)) * 1000 if p50 else None,
        "p99_ms": float(p99.group(1)) * 1000 if p99 else None,
    }


def measure(
    server_pid: int, url: str, body: Path, ctype: str, connections: int, duration: float
) -> dict[str, Any]:
    before = proc_cpu_by_role(server_pid)
    t0 = time.perf_counter()
    r = run_hey(url, body, ctype, connections, duration)
    wall = time.perf_counter() - t0
    after = proc_cpu_by_role(server_pid)
    if before is None or after is None:
        raise RuntimeError("cannot read the server's CPU from /proc (Linux only)")
    ok = r["codes"].get(200, 0)
    used = {k: v - before.get(k, 0.0) for k, v in after.items()}
    engine = used.pop("engine", 0.0)
    front = sum(used.values())
    per_img = {f"{k}_cpu_ms_per_img": v / ok * 1000 if ok else None for k, v in used.items()}
    return {
        "connections": connections,
        "img_s": ok / wall,
        "rps_hey": r["rps"],
        "non_200": sum(n for c, n in r["codes"].items() if c != 200) + r["errors"],
        "p50_ms": r["p50_ms"],
        "p99_ms": r["p99_ms"],
        "front_cpu_ms_per_img": front / ok * 1000 if ok else None,
        "engine_cpu_ms_per_img": engine / ok * 1000 if ok else None,
        "front_cores": front / wall,
        "engine_cores": engine / wall,
        **per_img,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.frontend", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="vit_test_tiny")
    p.add_argument("--connections", default="16", help="comma list: hey's concurrent connections, in turn")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per point")
    p.add_argument("--image-px", type=int, default=256)
    p.add_argument(
        "--server-env", action="append", default=[], metavar="VPT_X=V", help="extra vpt-serve setting"
    )
    p.add_argument("--json", default="benchmarks/results/frontend.json")
    p.add_argument("--quick", action="store_true", help="smoke: one 2 s point")
    args = p.parse_args(argv)
    if shutil.which("hey") is None:
        p.error("needs `hey` on PATH (Debian: apt-get install hey)")
    if args.quick:
        args.connections, args.duration = "4", 2.0
    conns = int_list(args.connections)
    # The load benchmark's server settings (one task, deep P=10, 10 classes, batches up to 64).
    largs = load_args(
        ["--preset", args.preset, "--tasks", "1", "--image-format", "jpeg", "--configs", "mixed"]
    )
    largs.server_env = args.server_env
    backbone = load_backbone(largs.spec)
    artifacts = task_artifacts(backbone, largs)
    (image,) = encode_images(1, args.image_px, "jpeg", 0)
    body, ctype = multipart([image], "vpt-frontend")
    work = Path(tempfile.mkdtemp(prefix="vpt-frontend-"))
    rows: list[dict[str, Any]] = []
    try:
        (work / "body").write_bytes(body)
        server = start_server("mixed", largs, work, work / "store")
        try:
            asyncio.run(upload_and_warm(server, artifacts, body, ctype, upload=True))
            url = f"{server.url}/v1/tasks/{next(iter(artifacts))}/classify"
            for c in conns:
                rows.append(measure(server.proc.pid, url, work / "body", ctype, c, args.duration))
                r = rows[-1]
                print(f"  {c:>3} connections: {r['img_s']:8.1f} img/s, front end {r['front_cpu_ms_per_img']:.2f} "
                      f"ms CPU/img, engine {r['engine_cpu_ms_per_img']:.2f}", flush=True)  # fmt: skip
        finally:
            server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        format_table(
            rows,
            [
                "connections",
                "img_s",
                "p50_ms",
                "p99_ms",
                "non_200",
                "front_cpu_ms_per_img",
                "engine_cpu_ms_per_img",
                "front_cores",
                "engine_cores",
            ],
            f"hey, one {args.image_px} px JPEG ({len(image) / 1e3:.0f} kB) per multipart request, "
            f"{largs.spec}, {args.duration:g} s per point",
        )
    )
    best = max(rows, key=lambda r: r["img_s"])
    if best["front_cpu_ms_per_img"]:
        print(
            f"\nfront end: {best['front_cpu_ms_per_img']:.2f} ms CPU per image in the server process "
            f"→ at most {1000 / best['front_cpu_ms_per_img']:,.0f} img/s per core it may use"
        )
    write_json(
        args.json, {"benchmark": "frontend", "machine": machine_info(), "config": vars(args), "rows": rows}
    )
    print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
