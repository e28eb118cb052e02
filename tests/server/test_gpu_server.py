"""On a GPU: a real `vpt-serve` on CUDA answers like the task's solo reference, through both engine paths.

Small batches replay CUDA graphs (`VPT_CUDA_GRAPH_MAX_BATCH`, default 8), larger ones run eagerly; the
server runs fp32 here so its scores can be held to the fp32 CPU reference (cuDNN's TF32 convolution and
the fused attention kernels leave ~1e-4 differences). Skipped without CUDA; benchmarks/gpu_check.sh
runs it.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from tests.server.helpers import BACKBONE_SPEC, artifact_bytes, png_bytes
from tests.server.server_proc import ServerProcess
from tests.server.test_api import expected_probs
from tests.server.test_integration import classify_many, upload
from vpt.hub import load_backbone

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.integration,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TASKS = {"deep5": (5, "deep", 4), "shallow2": (2, "shallow", 6), "linear": (0, "shallow", 3)}


def test_server_on_cuda_with_graphs_equals_solo_results(tmp_path):
    backbone = load_backbone(BACKBONE_SPEC)
    arts = {
        t: artifact_bytes(backbone, P=P, mode=m, C=C, seed=i)
        for i, (t, (P, m, C)) in enumerate(TASKS.items())
    }
    images = [png_bytes(200 + i) for i in range(6)]
    names = list(arts)
    proc = ServerProcess(
        tmp_path,
        backbone=BACKBONE_SPEC,
        device="cuda",
        dtype="float32",
        max_batch_size=32,
        max_prompt_length=16,
        # A tiny backbone on a GPU computes faster than requests arrive: a short wait lets the flood
        # form batches over 8 (the eager path) however fast the host is; one-by-one requests stay at 1.
        max_batch_delay_ms=20,
    ).wait_ready()
    try:
        assert "captured" in proc.log(), proc.log()  # the default VPT_CUDA_GRAPH_MAX_BATCH is on
        assert "CUDA graphs are off" not in proc.log(), proc.log()
        for t, data in arts.items():
            upload(proc.url, t, data)
        expected = {
            (t, i): expected_probs(backbone, arts[t], images[i]) for t in arts for i in range(len(images))
        }

        def check(jobs: list[tuple[str, int]], bodies: list[dict]) -> list[int]:
            """Every score within 1e-3 of the reference; returns the batch sizes the requests rode in."""
            for (t, i), body in zip(jobs, bodies, strict=True):
                got = {p["index"]: p["score"] for p in body["predictions"][0]}
                want = expected[(t, i)]
                assert sorted(got) == list(range(want.numel())), body
                assert [got[k] for k in range(want.numel())] == pytest.approx(want.tolist(), abs=1e-3)
            return [b["timings"]["batch_size"] for b in bodies]

        # One at a time: batches of 1, graph replays.
        one_by_one = [(names[j % 3], j % len(images)) for j in range(12)]
        bodies = [asyncio.run(classify_many(proc.url, [(t, images[i])], top_k=10))[0] for t, i in one_by_one]
        assert max(check(one_by_one, bodies)) == 1
        # All at once: batches up to 32, eager above 8.
        flood = [(names[j % 3], j % len(images)) for j in range(300)]
        sizes = check(
            flood, asyncio.run(classify_many(proc.url, [(t, images[i]) for t, i in flood], top_k=10))
        )
        print(f"flood: batch sizes max {max(sizes)}, mean {sum(sizes) / len(sizes):.1f}")
        assert max(sizes) > 8  # both paths served
    finally:
        assert proc.stop() == 0, proc.log()
