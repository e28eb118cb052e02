"""benchmarks/triton_load.py: its pure helpers, and the driver end to end at minimal sizes.

The end-to-end runs check that it reports what it promises (every point answered, with one answer per
image, sane rates and latencies, the /v1 comparison on the same server, a key sent as a Bearer
token), not how fast anything is. Servers listen on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from benchmarks.triton_load import batch_shape, hostport, serialize_bytes, summarize
from server.tenants import generate_key
from tests.server.helpers import BACKBONE_SPEC, artifact_bytes, write_tenants
from tests.server.server_proc import ServerProcess
from vpt.hub import load_backbone

REPO = Path(__file__).resolve().parents[2]
TINY = ["--duration", "2.5", "--warmup", "0.3", "--concurrency", "1,2", "--images-per-request", "1,8",
        "--images", "4", "--image-px", "64"]  # fmt: skip


def run_driver(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.triton_load", *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


# --- helpers ----------------------------------------------------------------------------------------------
def test_bytes_tensor_is_serialized_as_tritonclient_does() -> None:
    """perf_analyzer's input file carries the raw BYTES tensor: it must be Triton's own layout."""
    from tritonclient.utils import serialize_byte_tensor

    elements = [b"\xff\xd8jpeg", b"", b"x" * 300]
    expected = serialize_byte_tensor(np.array(elements, dtype=np.object_)).item()  # a 0-d object array
    assert serialize_bytes(elements) == expected


def test_batch_shape_fills_the_declared_shape() -> None:
    assert batch_shape([-1], 8) == [8]
    assert batch_shape([-1, 1], 8) == [8, 1]
    assert batch_shape([-1, -1], 3) == [3, 1]


def test_hostport_is_what_tritonclient_takes() -> None:
    assert hostport("http://127.0.0.1:8000/") == "127.0.0.1:8000"
    assert hostport("127.0.0.1:9000") == "127.0.0.1:9000"
    assert hostport("http://localhost") == "localhost:80"


def test_summary_counts_images_and_takes_percentiles_of_ok_requests() -> None:
    from collections import Counter

    r = summarize("v2 tritonclient", 8, 4, 2.0, [0.010, 0.020, 0.030], Counter({"status 429": 2}))
    assert (r.ok, r.img_s, r.req_s) == (3, 12.0, 1.5)
    assert r.p50_ms == pytest.approx(20.0) and r.p99_ms == pytest.approx(29.8)
    assert r.errors == {"status 429": 2}


# --- end to end -------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_own_server_run_reports_v2_and_v1_points(tmp_path: Path) -> None:
    out = tmp_path / "triton.json"
    r = run_driver(*TINY, "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    points = json.loads(out.read_text())["points"]
    seen = {(p["api"], p["images_per_request"], p["concurrency"]) for p in points}
    assert seen == {(api, n, c) for api in ("v2 tritonclient", "v1 loadgen") for n in (1, 8) for c in (1, 2)}
    for p in points:
        assert p["ok"] > 0 and p["errors"] == {}, p
        assert p["img_s"] == pytest.approx(p["req_s"] * p["images_per_request"])
        assert 0 < p["p50_ms"] <= p["p99_ms"] < 10_000, p
    assert "| v2 tritonclient | 8 | 2 |" in r.stdout


@pytest.mark.integration
def test_url_run_sends_the_key_and_counts_refusals(tmp_path: Path) -> None:
    key = generate_key()
    tenants = write_tenants(tmp_path, {"acme": key}, {"acme": {"rate_per_s": 10000.0}})  # a load, not a flood
    server = ServerProcess(tmp_path, backbone=BACKBONE_SPEC, tenants_file=tenants, open_mode="false")
    try:
        server.wait_ready(120)
        data = artifact_bytes(load_backbone(BACKBONE_SPEC), P=4, mode="deep", C=3, seed=0)
        put = httpx.put(f"{server.url}/v1/tasks/pets", content=data, timeout=30,
                        headers={"authorization": f"Bearer {key}", "content-type": "application/octet-stream"})  # fmt: skip
        assert put.status_code in (200, 201), put.text
        out = tmp_path / "url.json"
        base = [
            *TINY,
            "--concurrency",
            "1",
            "--images-per-request",
            "2",
            "--url",
            server.url,
            "--task",
            "pets",
        ]
        r = run_driver(*base, "--api-key", key, "--json", str(out))
        assert r.returncode == 0, r.stdout + r.stderr
        (p,) = json.loads(out.read_text())["points"]  # no /v1 run against a server it did not start
        assert p["api"] == "v2 tritonclient" and p["ok"] > 0 and p["errors"] == {}, p
        # A wrong key: refused when the driver reads the model's metadata, in one line, before any load.
        r = run_driver(*base, "--api-key", generate_key(), "--json", str(out))
        assert r.returncode == 2 and "model pets: status 401" in r.stderr, r.stdout + r.stderr
    finally:
        server.stop()


# A stand-in for Triton's perf_analyzer (not installable here): checks what the driver hands it as
# perf_analyzer would read it (the model's config from the server, the input file's BYTES tensors), and
# writes its CSV with made-up rates.
FAKE_PERF_ANALYZER = r"""#!PYTHON
import argparse, base64, csv, json, struct, sys, urllib.request
p = argparse.ArgumentParser()
for flag in ("-m", "-u", "-i", "--input-data", "--concurrency-range", "--measurement-interval",
             "--max-trials", "--stability-percentage", "-f", "-b"):
    p.add_argument(flag)
p.add_argument("-H", action="append", default=[])
a = p.parse_args()
config = json.load(urllib.request.urlopen(f"http://{a.u}/v2/models/{a.m}/config"))
assert (a.b is not None) == (config["max_batch_size"] > 0), (a.b, config["max_batch_size"])
name = next(i["name"] for i in config["input"] if i["data_type"] == "TYPE_STRING")
for sample in json.load(open(a.input_data))["data"]:
    raw, shape = base64.b64decode(sample[name]["b64"]), sample[name]["shape"]
    n, off = 0, 0
    while off < len(raw):
        (k,) = struct.unpack_from("<I", raw, off)
        assert raw[off + 4 : off + 6] == b"\xff\xd8", "not a JPEG"
        off, n = off + 4 + k, n + 1
    count = 1
    for d in shape:
        count *= d
    assert n == count, (n, shape)
c = int(a.concurrency_range.split(":")[0])
with open(a.f, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["Concurrency", "Inferences/Second", "p50 latency", "p99 latency"])
    w.writerow([c, 100 * c, 2000, 5000])
"""


@pytest.mark.integration
def test_perf_analyzer_run_reads_its_csv(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "perf_analyzer"
    fake.write_text(FAKE_PERF_ANALYZER.replace("PYTHON", sys.executable))
    fake.chmod(0o755)
    out = tmp_path / "pa.json"
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks.triton_load", *TINY, "--v1", "off", "--perf-analyzer",
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=240, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    points = json.loads(out.read_text())["points"]
    assert {(p["images_per_request"], p["concurrency"]) for p in points} == {(1, 1), (1, 2), (8, 1), (8, 2)}
    for p in points:
        assert p["api"] == "v2 perf_analyzer" and (p["p50_ms"], p["p99_ms"]) == (2.0, 5.0)
        # With -b n, perf_analyzer's inferences are images.
        assert p["img_s"] == pytest.approx(100 * p["concurrency"]), p
