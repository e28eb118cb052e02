"""Smoke tests of the benchmarks: pure helpers, and each script end to end at minimal sizes.

The end-to-end runs check that the scripts produce the numbers they promise (and that the engine
benchmark's mixed and per-task results agree, i.e. it measures a correct engine), not how fast anything is.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.common import expected_distinct, format_table, percentile, zipf_weights
from benchmarks.loadgen import (
    batch_stats,
    bucket_quantile,
    histogram_delta,
    multipart,
    parse_prometheus,
    poisson_arrivals,
    proc_cpu_by_role,
)

REPO = Path(__file__).resolve().parents[2]


def run_module(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


# --- helpers ----------------------------------------------------------------------------------------------
def test_zipf_weights_are_a_decreasing_distribution() -> None:
    w = zipf_weights(100, 1.1)
    assert sum(w) == pytest.approx(1.0)
    assert all(a > b for a, b in itertools.pairwise(w))
    assert w[0] / w[1] == pytest.approx(2**1.1)
    # 256 Zipf(1.1) draws over 100 tasks hit most of them: per-task batching runs ~60 batches.
    assert 50 < expected_distinct(100, 1.1, 256) < 80


def test_poisson_arrivals_have_the_offered_rate() -> None:
    arrivals = poisson_arrivals(200.0, 20.0, random.Random(0))
    assert len(arrivals) == pytest.approx(4000, rel=0.05)
    assert arrivals == sorted(arrivals) and arrivals[0] >= 0 and arrivals[-1] < 20.0


def test_percentile_interpolates_like_numpy() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5.0], 99) == 5.0


PROM_BEFORE = """# HELP vpt_batch_size Images per forward pass
vpt_batch_size_bucket{le="1.0"} 2.0
vpt_batch_size_bucket{le="8.0"} 2.0
vpt_batch_size_bucket{le="64.0"} 2.0
vpt_batch_size_bucket{le="+Inf"} 2.0
vpt_batch_size_sum 2.0
vpt_batch_size_count 2.0
vpt_batch_compute_seconds_sum 0.1
vpt_batch_compute_seconds_count 2.0
"""
PROM_AFTER = """vpt_batch_size_bucket{le="1.0"} 3.0
vpt_batch_size_bucket{le="8.0"} 5.0
vpt_batch_size_bucket{le="64.0"} 6.0
vpt_batch_size_bucket{le="+Inf"} 6.0
vpt_batch_size_sum 50.0
vpt_batch_size_count 6.0
vpt_batch_compute_seconds_sum 1.1
vpt_batch_compute_seconds_count 6.0
vpt_requests_total{route="/v1/tasks/{task_id}/classify",status="200"} 7.0
"""


def test_batch_sizes_are_read_from_metric_deltas() -> None:
    before, after = parse_prometheus(PROM_BEFORE), parse_prometheus(PROM_AFTER)
    assert (
        after[("vpt_requests_total", (("route", "/v1/tasks/{task_id}/classify"), ("status", "200")))] == 7.0
    )
    buckets, total, n = histogram_delta(before, after, "vpt_batch_size")
    assert (total, n) == (48.0, 4.0)
    assert buckets[1.0] == 1.0 and buckets[8.0] == 3.0 and buckets[float("inf")] == 4.0
    assert bucket_quantile(buckets, 0.5) == 8.0
    stats = batch_stats(before, after, wall_s=2.0)
    assert stats["batches"] == 4 and stats["mean_batch"] == 12.0
    assert stats["histogram"] == {"<=1": 1, "<=8": 2, "<=64": 1}
    assert stats["engine_busy"] == pytest.approx(0.5)


def test_multipart_body_parses_as_files() -> None:
    from python_multipart import MultipartParser  # what Starlette parses uploads with

    body, ctype = multipart([b"abc", b"\x00\x01"], "bnd")
    assert ctype == "multipart/form-data; boundary=bnd"
    parts: list[bytes] = []
    parser = MultipartParser(
        "bnd",
        callbacks={
            "on_part_begin": lambda: parts.append(b""),
            "on_part_data": lambda d, s, e: parts.__setitem__(-1, parts[-1] + d[s:e]),
        },
    )
    parser.write(body)
    assert parts == [b"abc", b"\x00\x01"]


def test_table_formats_numbers() -> None:
    text = format_table([{"a": 1234.5, "b": 0.01234, "c": None}], ["a", "b", "c"])
    assert "| 1,234 | 0.0123 | - |" in text


# --- the scripts, end to end ---------------------------------------------------------------------------------
def test_engine_benchmark_quick(tmp_path: Path) -> None:
    out = tmp_path / "engine.json"
    r = run_module("benchmarks.engine", "--quick", "--threads", "1", "--json", str(out), timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    d = json.loads(out.read_text())
    assert {row["mode"] for row in d["sweep"]} == {"none", "shallow", "deep", "tokens"}
    assert all(row["img_s"] > 0 for row in d["sweep"])
    # Deep prompts as keys/values and as tokens (the engine before issue J) score the same, in the run.
    tokens = [row for row in d["sweep"] if row["mode"] == "tokens"]
    assert tokens and all(row["max_abs_score_diff_vs_deep"] < 1e-5 for row in tokens)
    assert "faster; max |score diff|" in r.stdout
    ratios = {(r["mode"], r["P"]): r for r in d["deep_ratios"]}  # interleaved, at one batch size
    assert (
        set(ratios) == {("none", 0), ("deep", 4), ("tokens", 4)} and ratios[("none", 0)]["vs_no_prompt"] == 1
    )
    (m,) = d["modes"]  # shallow + deep in one batch (of 8; batch 1 has no mix): three ways, same features
    assert m["batch"] == 8 and m["split_img_s"] > 0 and m["one_forward_img_s"] > 0 and m["tokens_img_s"] > 0
    assert m["max_rel_diff"] < 1e-5 and m["engine"] in ("split", "one_forward")
    z = d["zipf"]
    assert z["mixed_img_s"] > 0 and z["per_task_img_s"] > 0 and z["per_task_batches"] == z["distinct_tasks"]
    assert z["max_abs_score_diff"] < 1e-4  # same requests, same scores, whichever way they were batched
    assert [row["batch"] for row in d["latency"]] == [1]
    assert "mixed / per-task" in r.stdout


@pytest.mark.integration
def test_load_benchmark_quick(tmp_path: Path) -> None:
    out, png = tmp_path / "load.json", tmp_path / "load.png"
    plot = str(png) if importlib.util.find_spec("matplotlib") else "none"
    r = run_module(
        "benchmarks.load", "--quick", "--configs", "mixed,naive", "--rates", "20",
        "--json", str(out), "--plot", plot, timeout=280,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    d = json.loads(out.read_text())
    for config in ("mixed", "naive"):
        (point,) = d["points"][config]
        assert point["ok"] > 0 and point["errors"] == {}, point
        assert point["p50_ms"] <= point["p99_ms"]
    assert d["points"]["mixed"][0]["batches"]["batches"] > 0  # /metrics was read
    assert d["points"]["mixed"][0]["server_ms"]["total_ms"] > 0  # the server's own timings were read
    assert {"mixed_vs_naive", "http_vs_raw_engine_max_batch"} <= set(d["summary"])
    assert d["cold_load"] and d["cold_load"][0]["ms_per_MB"] > 0
    if plot != "none":
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.integration
def test_core_benchmark_quick(tmp_path: Path) -> None:
    """The engine core alone, driven through the API servers' protocol: requests answered, and the
    core's CPU read apart from its engine process's."""
    out = tmp_path / "core.json"
    r = run_module("benchmarks.core", "--quick", "--json", str(out), timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert row["img_s"] > 0 and row["failed"] == 0, row
    assert row["core_cpu_ms_per_img"] > 0 and row["engine_cpu_ms_per_img"] > 0
    assert "ms CPU per image" in r.stdout


def test_cpu_by_role_tells_the_server_processes_apart() -> None:
    """`proc_cpu_by_role` names processes by /proc/<pid>/comm, as `name_process` sets it."""
    code = (
        "import sys, time; from server.threads import name_process; name_process(sys.argv[1]);"
        "t = time.process_time() + 0.3\nwhile time.process_time() < t: pass\ntime.sleep(30)"
    )
    kids = [
        subprocess.Popen([sys.executable, "-c", code, name], cwd=REPO) for name in ("vpt-engine", "vpt-api-0")
    ]
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            roles = proc_cpu_by_role(os.getpid()) or {}
            if roles.get("engine", 0) >= 0.25 and roles.get("api", 0) >= 0.25:
                break
            time.sleep(0.1)
        assert roles.get("engine", 0) >= 0.25 and roles.get("api", 0) >= 0.25, roles
        assert "server" in roles  # this process, the one asked about
    finally:
        for k in kids:
            k.kill()
            k.wait()


def test_gpu_check_script_parses() -> None:
    r = subprocess.run(
        ["bash", "-n", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
