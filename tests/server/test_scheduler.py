"""Scheduler with the real engine and a real local store: residency, deadlines, cancellation, fairness."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from prompt_store.local import LocalStore
from server.engine.engine import Engine
from server.errors import DeadlineExceeded, TaskNotFound
from server.scheduler.scheduler import Scheduler, SchedulerConfig
from tests.server.helpers import BACKBONE_SPEC, artifact_bytes
from vpt.hub import load_backbone


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


async def started(backbone, store, **cfg) -> Scheduler:
    engine = Engine(backbone, bank_slots=8, max_prompt_length=8, max_classes=8)
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
