"""The CUDA-graph path's padded static forward (server/engine/graphs.py).

On CPU the same padded forward runs eagerly (`capture=False`): batches padded to the next bucket and
prompts to the next prompt-length bucket, always masked, must give every sample what the eager engine
gives it. The `gpu` tests capture real graphs (skipped without CUDA; benchmarks/gpu_check.sh runs them).
"""

from __future__ import annotations

import pytest
import torch

from server.engine.bank import TaskKey
from server.engine.batch import EngineBatch
from server.engine.engine import Engine
from server.engine.graphs import FeatureGraphs, buckets
from tests.server.helpers import BACKBONE_SPEC, make_artifact
from vpt.hub import load_backbone

TASKS = [(4, "deep", 3), (0, "shallow", 5), (9, "shallow", 10), (12, "deep", 7), (1, "deep", 2)]


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(BACKBONE_SPEC)


def engine_with_tasks(backbone, device: str = "cpu", **kw) -> tuple[Engine, list[int]]:
    engine = Engine(backbone, bank_slots=8, max_prompt_length=12, max_classes=10, **kw)
    slots = [
        engine.install(TaskKey("t", f"task{i}", 1), make_artifact(backbone, P=P, mode=m, C=C, seed=i))
        for i, (P, m, C) in enumerate(TASKS)
    ]
    return engine, slots


def run(engine: Engine, images: torch.Tensor, slots: list[int], output: str = "classify"):
    infos = [engine.bank.info(s) for s in slots]
    return engine.run(EngineBatch(images, slots, infos, output, top_k=10))  # type: ignore[arg-type]


def test_buckets():
    assert buckets(1) == [1]
    assert buckets(8) == [1, 2, 4, 8]
    assert buckets(12) == [1, 2, 4, 8, 12]
    assert buckets(50) == [1, 2, 4, 8, 16, 32, 50]
    assert buckets(0) == []


def test_fits_picks_the_smallest_bucket(backbone):
    engine, _ = engine_with_tasks(backbone)
    g = FeatureGraphs(engine.model, engine.bank, max_batch=8, capture=False)
    assert g.fits(1, 0) == (1, 1)
    assert g.fits(3, 5) == (4, 8)
    assert g.fits(8, 12) == (8, 12)
    assert g.fits(9, 1) is None  # larger batches run eagerly
    assert g.fits(2, 13) is None


def test_padded_static_forward_equals_the_eager_engine(backbone):
    """Every batch size and task mix, including a bucket reused with stale padding rows from a larger
    previous batch: features and classifications equal the eager engine's, sample by sample."""
    engine, slots = engine_with_tasks(backbone)
    gen = torch.Generator().manual_seed(0)
    batches = [
        [0],
        [1],
        [3, 1],
        [2, 4, 0],
        [0, 1, 2, 3, 4],
        [3, 3, 3, 3, 3, 3, 3],
        [4, 2, 0, 1, 3, 1, 2, 0],
        [1],
        [0, 1, 2, 3, 4, 0, 1, 2, 3],  # past max_batch: `run` declines, the engine runs it eagerly
    ]
    eager = []
    for order in batches:
        images = torch.randint(0, 256, (len(order), 3, 32, 32), dtype=torch.uint8, generator=gen)
        s = [slots[i] for i in order]
        eager.append((images, s, run(engine, images, s, "embed"), run(engine, images, s)))
    engine.graphs = FeatureGraphs(engine.model, engine.bank, max_batch=8, capture=False)
    engine.graphs.prepare()
    for images, s, feats, cls in eager:
        g_feats, g_cls = run(engine, images, s, "embed"), run(engine, images, s)
        err = (g_feats.features - feats.features).abs().max() / feats.features.abs().max()
        assert err < 1e-5, (s, err.item())
        assert torch.allclose(g_cls.scores, cls.scores, atol=1e-6)
        for b, slot in enumerate(s):
            C = TASKS[slots.index(slot)][2]
            assert g_cls.indices[b, :C].tolist() == cls.indices[b, :C].tolist()


class Replay:
    """Stands in for torch.cuda.CUDAGraph on CPU: `replay()` runs `fn`."""

    def __init__(self, fn) -> None:
        self.replay = fn


def test_capture_check_catches_a_replay_that_ignores_its_inputs(backbone):
    """The check run after capture must pass a faithful replay and refuse one that reads stale inputs
    (the failure a capture bug produces), which turns graphs off instead of serving wrong results."""
    engine, _ = engine_with_tasks(backbone)
    g = FeatureGraphs(engine.model, engine.bank, max_batch=2, capture=False)
    g.prepare()
    for (_, P, deep), st in g._static.items():
        st.out = g._forward(st, P, deep).clone()
        st.graph = Replay(lambda st=st, P=P, d=deep: st.out.copy_(g._forward(st, P, d)))  # type: ignore[assignment]
    with torch.inference_mode():
        g._check()  # faithful: passes
        for (_, P, deep), st in g._static.items():
            st.x.zero_()
            st.out.copy_(g._forward(st, P, deep))  # what the last replay wrote, for other inputs...
            st.graph = Replay(lambda: None)  # type: ignore[assignment]  # ...and a replay that keeps it
        with pytest.raises(RuntimeError, match="differs from eager"):
            g._check()


def test_graphs_are_cuda_only(backbone):
    engine, _ = engine_with_tasks(backbone, cuda_graph_max_batch=8)
    engine.warmup((1,))
    assert engine.graphs is None  # CPU: eager, whatever the setting


# ------------------------------------------------------------------------------------------- GPU


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_equal_eager_and_survive_pipelining(dtype):
    bb = load_backbone(BACKBONE_SPEC, device="cuda", dtype=dtype)
    graphed, slots = engine_with_tasks(bb, cuda_graph_max_batch=8)
    graphed.warmup((1, 8))
    assert graphed.graphs is not None
    eager, eager_slots = engine_with_tasks(bb)
    assert eager_slots == slots  # same install order, same slots: one batch serves both engines
    gen = torch.Generator().manual_seed(1)
    # Buckets (batch, prompts): (1, 4), (4, 12), (4, 12), (2, 12), (1, 12), (1, 12), (8, 12) — the
    # repeated ones refill buffers that the previous batch's replay may still be reading.
    orders = [[0], [3, 1, 4], [2, 2, 0], [2, 2], [3], [2], [0, 1, 2, 3, 4, 0, 1, 2]]
    images = [torch.randint(0, 256, (len(o), 3, 32, 32), dtype=torch.uint8, generator=gen) for o in orders]
    batches = [
        EngineBatch(im, [slots[i] for i in o], [graphed.bank.info(slots[i]) for i in o], "classify", 10)
        for im, o in zip(images, orders, strict=True)
    ]
    # Submit all before collecting any: a bucket's buffers are reused while earlier results are in
    # flight. ...and nothing in a launch may wait for the device (a blocking copy would serialise the
    # pipeline); the collect thread's event wait is not such a sync (`set_sync_debug_mode` ignores it).
    torch.cuda.set_sync_debug_mode("error")
    try:
        pending = [graphed.submit(b) for b in batches]
        results = [p.result(timeout=60) for p in pending]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for b, r in zip(batches, results, strict=True):
        ref = eager.run(b)
        tol = 1e-4 if dtype == torch.float32 else 2e-2  # bf16: masked vs unmasked kernels round differently
        assert torch.allclose(r.scores, ref.scores, atol=tol), (r.scores - ref.scores).abs().max()
