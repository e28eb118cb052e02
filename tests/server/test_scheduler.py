"""Scheduler with the real engine and a real local store: residency, deadlines, cancellation, fairness."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
import torch

from prompt_store.local import LocalStore
from server.engine.engine import Engine
from server.engine.process import ProcessConfig
from server.errors import DeadlineExceeded, TaskNotFound, Unavailable
from server.scheduler.scheduler import Scheduler, SchedulerConfig
from tests.server.helpers import BACKBONE_SPEC, artifact_bytes
from vpt.config import get_preset
from vpt.fingerprint import backbone_fingerprint
from vpt.hub import Backbone, load_backbone
from vpt.vit import VisionTransformer


class SlowStore(LocalStore):
    """Fault injection: reading one task takes `delay` seconds (a slow disk or S3)."""

    slow_task = "slow"
    delay = 1.0

    def get(self, tenant, task_id, version=None):
        if task_id == self.slow_task:
            time.sleep(self.delay)
        return super().get(tenant, task_id, version)


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(BACKBONE_SPEC)


@pytest.fixture
def store(tmp_path, backbone):
    s = SlowStore(tmp_path / "store")
    for i, t in enumerate(("slow", "fast", "other")):
        s.put("acme", t, artifact_bytes(backbone, P=3, mode="deep", C=4, seed=i))
    s.put("beta", "fast", artifact_bytes(backbone, P=2, mode="shallow", C=4, seed=9))
    return s


def images(n: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)


async def started(backbone, store, engine_kw: dict | None = None, **cfg) -> Scheduler:
    engine = Engine(backbone, bank_slots=8, max_prompt_length=8, max_classes=8, **(engine_kw or {}))
    sched = Scheduler(engine, store, SchedulerConfig(**cfg))
    await sched.start()
    return sched


def test_cold_load_does_not_stall_other_tasks(backbone, store):
    async def scenario():
        sched = await started(backbone, store)
        try:
            t0 = time.monotonic()
            slow = asyncio.create_task(sched.submit("acme", "slow", images()))
            await asyncio.sleep(0.01)
            await sched.submit("acme", "fast", images())  # loads and runs while "slow" is loading
            fast_done = time.monotonic() - t0
            await slow
            return fast_done, time.monotonic() - t0
        finally:
            await sched.close()

    fast_done, slow_done = asyncio.run(scenario())
    assert fast_done < SlowStore.delay <= slow_done


def test_deadline_in_queue_gives_504_and_cancel_frees_the_queue(backbone, store):
    async def scenario():
        sched = await started(backbone, store)
        try:
            with pytest.raises(DeadlineExceeded):
                await sched.submit("acme", "slow", images(), timeout_s=0.2)
            waiting = asyncio.create_task(sched.submit("acme", "slow", images(3)))
            await asyncio.sleep(0.05)
            assert sched.queued_images == 3
            waiting.cancel()  # the client went away
            await asyncio.sleep(0.01)
            assert sched.queued_images == 0
        finally:
            await sched.close()

    asyncio.run(scenario())


def test_unknown_task_fails_fast(backbone, store):
    async def scenario():
        sched = await started(backbone, store)
        try:
            with pytest.raises(TaskNotFound):
                await sched.submit("acme", "missing", images())
            with pytest.raises(TaskNotFound):  # tenants are separate namespaces
                await sched.submit("beta", "other", images())
        finally:
            await sched.close()

    asyncio.run(scenario())


def test_round_robin_across_tenants_and_per_task_mode(backbone, store):
    async def run(batching: str):
        sched = await started(backbone, store, max_batch_size=4, batching=batching)
        try:
            # Warm both tasks so residency does not decide the order.
            await asyncio.gather(
                sched.submit("acme", "fast", images()), sched.submit("beta", "fast", images())
            )
            order: list[str] = []

            async def one(tenant: str, task: str):
                r = await sched.submit(tenant, task, images())
                order.append(tenant)
                return r

            jobs = [one("acme", "fast") for _ in range(12)] + [one("beta", "fast")]
            results = await asyncio.gather(*jobs)
            return order, results
        finally:
            await sched.close()

    order, results = asyncio.run(run("mixed"))
    assert order.index("beta") < 4  # beta rode in the first batch despite acme's 12 queued requests
    assert max(r.batch_size for r in results) == 4
    order, results = asyncio.run(run("per_task"))
    beta = results[-1]
    assert beta.batch_size == 1  # per-task batches never mix tasks


def overtake(bb: Backbone, tmp_path, preempt: bool, engine_kw: dict | None = None):
    """A heavy tenant's 48-image batch starts; a light tenant's one image arrives while it computes.
    Returns the light request alone (before), its result (or exception) then, and the finishing order."""
    st = LocalStore(tmp_path / "store")
    st.put("heavy", "t", artifact_bytes(bb, P=4, mode="deep", C=5, seed=1))
    st.put("light", "t", artifact_bytes(bb, P=2, mode="shallow", C=3, seed=2))
    S = bb.cfg.img_size
    big = torch.randint(0, 256, (48, 3, S, S), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    one = big[:1].clone()

    async def scenario():
        sched = await started(bb, st, engine_kw, max_batch_size=48, preempt=preempt)
        try:
            alone = await sched.submit("light", "t", one)
            await sched.submit("heavy", "t", big[:1])  # both tasks resident
            done: list[str] = []

            async def run(tenant: str, x: torch.Tensor):
                try:
                    return await sched.submit(tenant, "t", x)
                except Exception as e:
                    return e
                finally:
                    done.append(tenant)

            heavy = asyncio.create_task(run("heavy", big))
            proc = getattr(sched.engine.executor, "process", None)
            # The heavy batch has been dispatched (and, to an engine process, sent: else the light one
            # could reach its pipe first and simply go first).
            while not sched.in_flight or (proc is not None and not proc.in_flight):
                await asyncio.sleep(0.0005)
            light = await run("light", one)
            assert not isinstance(await heavy, Exception)
            assert sched.in_flight == 0 and sched.queued_images == 0
            return alone, light, done
        finally:
            await sched.close()
            sched.engine.close()

    return asyncio.run(scenario())


# The engine thread in this process, or the engine process (server/engine/process.py).
ENGINES = {"thread": {}, "process": {"process": ProcessConfig(max_batch_size=48)}}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("preempt", [True, False])
def test_cpu_preemption_lets_a_light_tenant_overtake_a_running_batch(tmp_path, preempt, engine):
    """A light tenant's request that arrives while a heavy tenant's big batch computes runs between
    two of that batch's blocks (preempt=True) instead of after it, with the same result as alone."""
    bb = load_backbone("random:vit_test_small@0")  # 4 blocks: a 48-image batch takes ~0.1 s on CPU
    alone, light, done = overtake(bb, tmp_path, preempt, ENGINES[engine])
    assert done == (["light", "heavy"] if preempt else ["heavy", "light"])
    assert light.batch_size == 1
    assert [p.index for p in light.predictions[0]] == [p.index for p in alone.predictions[0]]
    for a, b in zip(light.predictions[0], alone.predictions[0], strict=True):
        assert a.score == pytest.approx(b.score, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_failing_overtaker_fails_only_its_own_request(tmp_path, engine):
    """The overtaking batch (the 4th launch) fails: its request gets a 503, the batch it overtook
    completes, and nothing stays in flight."""
    bb = load_backbone("random:vit_test_small@0")
    _, light, done = overtake(bb, tmp_path, True, {"fault_fail_every": 4, **ENGINES[engine]})
    assert isinstance(light, Unavailable) and "inference failed" in str(light)
    assert done == ["light", "heavy"]


@pytest.mark.parametrize("engine", ENGINES)
def test_an_overtaker_handed_over_after_the_last_block_boundary_still_runs(tmp_path, engine):
    """A one-block backbone has no block boundary: the overtaker handed over while the batch runs
    is run right after it (not stranded), with the same result as alone."""
    cfg = dataclasses.replace(get_preset("vit_test_small"), depth=1)
    model = VisionTransformer(cfg).init_random(torch.Generator().manual_seed(0)).eval().requires_grad_(False)
    bb = Backbone(model, cfg, backbone_fingerprint(model.state_dict()), "random:depth1", "random:depth1")
    alone, light, done = overtake(bb, tmp_path, True, ENGINES[engine])
    assert done == ["heavy", "light"]
    assert [p.index for p in light.predictions[0]] == [p.index for p in alone.predictions[0]]
