"""benchmarks/frontend.py: hey's report read right (in CI, from recorded reports), and the benchmark
end to end where `hey` is installed (`apt-get install hey`; CI has no Debian packages)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from benchmarks.frontend import parse_hey
from tests.benchmarks.test_bench_smoke import run_module

# `hey -n 50 -c 2` against a static file server, and `hey -z 1s` against a closed port (hey 0.1.4).
HEY_OK = "\nSummary:\n  Total:\t0.0922 secs\n  Slowest:\t0.0071 secs\n  Fastest:\t0.0014 secs\n  Average:\t0.0036 secs\n  Requests/sec:\t542.3558\n  \n  Total data:\t404150 bytes\n  Size/request:\t8083 bytes\n\nResponse time histogram:\n  0.001 [1]\t|■■■\n  0.002 [8]\t|■■■■■■■■■■■■■■■■■■■■■■■■■\n  0.003 [3]\t|■■■■■■■■■\n  0.003 [13]\t|■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■\n  0.004 [3]\t|■■■■■■■■■\n  0.004 [1]\t|■■■\n  0.005 [9]\t|■■■■■■■■■■■■■■■■■■■■■■■■■■■■\n  0.005 [6]\t|■■■■■■■■■■■■■■■■■■\n  0.006 [2]\t|■■■■■■\n  0.007 [3]\t|■■■■■■■■■\n  0.007 [1]\t|■■■\n\n\nLatency distribution:\n  10% in 0.0019 secs\n  25% in 0.0026 secs\n  50% in 0.0032 secs\n  75% in 0.0048 secs\n  90% in 0.0058 secs\n  95% in 0.0060 secs\n  0% in 0.0000 secs\n\nDetails (average, fastest, slowest):\n  DNS+dialup:\t0.0001 secs, 0.0014 secs, 0.0071 secs\n  DNS-lookup:\t0.0000 secs, 0.0000 secs, 0.0000 secs\n  req write:\t0.0000 secs, 0.0000 secs, 0.0001 secs\n  resp wait:\t0.0033 secs, 0.0013 secs, 0.0066 secs\n  resp read:\t0.0001 secs, 0.0000 secs, 0.0015 secs\n\nStatus code distribution:\n  [200]\t50 responses\n\n\n\n"
HEY_REFUSED = '\nSummary:\n  Total:\t1.0003 secs\n  Slowest:\t0.0000 secs\n  Fastest:\t0.0000 secs\n  Average:\t NaN secs\n  Requests/sec:\t54428.4896\n  \n\nResponse time histogram:\n\n\nLatency distribution:\n\nDetails (average, fastest, slowest):\n  DNS+dialup:\t NaN secs, 0.0000 secs, 0.0000 secs\n  DNS-lookup:\t NaN secs, 0.0000 secs, 0.0000 secs\n  req write:\t NaN secs, 0.0000 secs, 0.0000 secs\n  resp wait:\t NaN secs, 0.0000 secs, 0.0000 secs\n  resp read:\t NaN secs, 0.0000 secs, 0.0000 secs\n\nStatus code distribution:\n\nError distribution:\n  [54446]\tGet "http://127.0.0.1:9/": dial tcp 127.0.0.1:9: connect: connection refused\n\n'


def test_hey_report_is_read() -> None:
    r = parse_hey(HEY_OK)
    assert r == {"rps": 542.3558, "codes": {200: 50}, "errors": 0, "p50_ms": 3.2, "p99_ms": None}


def test_failed_requests_are_counted_not_taken_for_responses() -> None:
    r = parse_hey(HEY_REFUSED)
    assert r["codes"] == {} and r["errors"] == 54446 and r["p50_ms"] is None


def test_an_unreadable_report_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="cannot read"):
        parse_hey("hey: command failed")


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("hey") is None, reason="needs hey (apt-get install hey)")
def test_frontend_benchmark_quick(tmp_path: Path) -> None:
    out = tmp_path / "frontend.json"
    r = run_module("benchmarks.frontend", "--quick", "--json", str(out), timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert row["img_s"] > 0 and row["non_200"] == 0
    assert row["front_cpu_ms_per_img"] > 0 and row["engine_cpu_ms_per_img"] > 0  # both processes read
