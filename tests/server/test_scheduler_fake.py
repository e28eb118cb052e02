"""The scheduler against a fake executor: no model, batches finish when the test says so.

The engine's one interface (`Engine.submit` / `Engine.preempt`, `server/engine/executors.py`) is all the
scheduler uses, so an executor that answers from the batch's slots alone, and holds batches open on
request, lets these tests pin down batching, result routing, pipelining, the out-of-memory split and
preemption exactly, with no timing. The same behaviours run against the real executors in
test_scheduler.py.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future

import pytest
import torch

from prompt_store.local import LocalStore
from server.engine.bank import TaskKey
from server.engine.batch import EngineBatch, EngineResult
from server.engine.engine import Engine
from server.engine.executors import Executor
from server.scheduler.scheduler import Scheduler, SchedulerConfig
from tests.server.helpers import BACKBONE_SPEC, artifact_bytes
from vpt.hub import load_backbone

C = 8  # classes of every task


class FakeExecutor(Executor):
    """Answers a batch without computing: sample b's classes ranked from `slot_b % C` up, so a result
    shows which slot it was computed for. `hold`: batches wait for `release()`."""

    def __init__(self, hold: bool = False, oom_over: int = 0) -> None:
        super().__init__("fake-engine")
        self.hold, self.oom_over = hold, oom_over
        self.submitted: list[tuple[list[int], bool]] = []  # (slots, preemptible) per batch, in order
        self.preempted: list[list[int]] = []
        self.held: list[tuple[EngineBatch, Future[EngineResult]]] = []
        self.in_flight = self.max_in_flight = 0

    @staticmethod
    def answer(batch: EngineBatch) -> EngineResult:
        k = min(batch.top_k, C)
        idx = torch.tensor([[(s + j) % C for j in range(k)] for s in batch.slots])
        scores = torch.tensor([[1.0 / (j + 1) for j in range(k)]] * len(batch.slots))
        return EngineResult(scores=scores, indices=idx, features=None, compute_s=0.0)

    def submit(self, batch: EngineBatch, preemptible: bool = False) -> Future[EngineResult]:
        self.submitted.append((list(batch.slots), preemptible))
        fut: Future[EngineResult] = Future()
        if self.oom_over and len(batch.slots) > self.oom_over:
            fut.set_exception(torch.OutOfMemoryError(f"fake: {len(batch.slots)} > {self.oom_over}"))
            return fut
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        fut.add_done_callback(lambda _: setattr(self, "in_flight", self.in_flight - 1))
        if self.hold:
            self.held.append((batch, fut))
        else:
            fut.set_result(self.answer(batch))
        return fut

    def preempt(self, batch: EngineBatch) -> Future[EngineResult]:
        self.preempted.append(list(batch.slots))
        fut: Future[EngineResult] = Future()
        fut.set_result(self.answer(batch))  # runs "between two blocks" of the held batch
        return fut

    def release(self) -> None:
        held, self.held = self.held, []
        for batch, fut in held:
            fut.set_result(self.answer(batch))


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(BACKBONE_SPEC)


@pytest.fixture
def store(tmp_path, backbone):
    s = LocalStore(tmp_path / "store")
    for i, t in enumerate(("a", "b", "c")):
        s.put("acme", t, artifact_bytes(backbone, P=2, mode="deep", C=C, seed=i))
    s.put("beta", "b", artifact_bytes(backbone, P=1, mode="shallow", C=C, seed=7))
    return s


async def started(backbone, store, fake: FakeExecutor, **cfg) -> Scheduler:
    """A scheduler on a real engine whose executor is `fake`, every task already resident (so a
    batch's makeup depends on the queues alone); `fake.submitted` then starts empty."""
    engine = Engine(backbone, bank_slots=8, max_prompt_length=4, max_classes=C)
    engine.executor.close()
    engine.executor = fake
    sched = Scheduler(engine, store, SchedulerConfig(**cfg))
    await sched.start()
    hold, fake.hold = fake.hold, False
    for tenant, task in (("acme", "a"), ("acme", "b"), ("acme", "c"), ("beta", "b")):
        await sched.submit(tenant, task, images(1))
    fake.hold = hold
    fake.submitted.clear()
    return sched


def images(n: int) -> torch.Tensor:
    return torch.zeros(n, 3, 32, 32, dtype=torch.uint8)


async def until(cond, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.001)


async def queued_behind_a_held_batch(
    sched: Scheduler, fake: FakeExecutor, asks: list[tuple[str, str, int]]
) -> tuple[asyncio.Future, list[asyncio.Future]]:
    """One request's batch held in the engine, then `asks` (tenant, task, images) queued behind it:
    they will form the next batch. Returns the first request and the queued ones."""
    first = asyncio.ensure_future(sched.submit("acme", "a", images(1)))
    await until(lambda: len(fake.held) == 1)
    later = [asyncio.ensure_future(sched.submit(t, k, images(n))) for t, k, n in asks]
    await until(lambda: sched.queued_images == sum(n for _, _, n in asks))
    return first, later


def slot_of(sched: Scheduler, tenant: str, task: str) -> int:
    slot = sched.engine.bank.lookup(TaskKey(tenant, task, 1))
    assert slot is not None
    return slot


def test_a_mixed_batch_routes_every_row_to_its_request(backbone, store):
    """Requests of several tasks and tenants, 1-3 images each, wait behind a held batch and then share
    one batch; each gets back exactly its own rows."""

    async def scenario():
        fake = FakeExecutor(hold=True)
        sched = await started(backbone, store, fake, max_batch_size=64)
        try:
            asks = [("acme", "b", 2), ("beta", "b", 1), ("acme", "c", 3), ("acme", "a", 1), ("beta", "b", 2)]
            first, later = await queued_behind_a_held_batch(sched, fake, asks)
            fake.release()  # the first batch ends; the rest go in one batch
            await until(lambda: len(fake.held) == 1)
            fake.release()
            results = await asyncio.gather(first, *later)
            assert [len(slots) for slots, _ in fake.submitted] == [1, 9]
            for (tenant, task, n), res in zip([("acme", "a", 1), *asks], results, strict=True):
                slot = slot_of(sched, tenant, task)
                assert res.batch_size == (1 if res is results[0] else 9)
                assert res.predictions is not None and len(res.predictions) == n
                assert all(p[0].index == slot % C for p in res.predictions), (tenant, task)
        finally:
            await sched.close()

    asyncio.run(scenario())


def test_pipeline_depth_bounds_the_batches_in_flight(backbone, store):
    async def scenario():
        fake = FakeExecutor(hold=True)
        sched = await started(backbone, store, fake, max_batch_size=1, pipeline_depth=2)
        try:
            reqs = [asyncio.ensure_future(sched.submit("acme", "a", images(1))) for _ in range(5)]
            await until(lambda: len(fake.held) == 2)
            await asyncio.sleep(0.05)  # the scheduler had its chance to send a third
            assert fake.in_flight == 2 and sched.queued_images == 3
            while not all(r.done() for r in reqs):
                fake.release()
                await asyncio.sleep(0.001)
            assert fake.max_in_flight == 2 and len(fake.submitted) == 5
            await asyncio.gather(*reqs)
        finally:
            await sched.close()

    asyncio.run(scenario())


def test_out_of_memory_splits_a_batch_until_it_fits(backbone, store):
    """An engine out-of-memory error on a batch of 6 requests: the scheduler retries halves, then
    quarters, one after the other; every request is answered, from its own rows."""

    async def scenario():
        fake = FakeExecutor(hold=True)
        sched = await started(backbone, store, fake, max_batch_size=64)
        try:
            tasks = ["a", "b", "c", "a", "b", "c"]
            first, later = await queued_behind_a_held_batch(sched, fake, [("acme", t, 1) for t in tasks])
            fake.hold, fake.oom_over = False, 2
            fake.release()
            results = await asyncio.gather(first, *later)
            assert [len(s) for s, _ in fake.submitted] == [1, 6, 3, 1, 2, 3, 1, 2]
            for task, res in zip(tasks, results[1:], strict=True):
                assert res.predictions is not None
                assert res.predictions[0][0].index == slot_of(sched, "acme", task) % C
        finally:
            await sched.close()

    asyncio.run(scenario())


def test_a_later_lighter_tenant_is_handed_to_the_running_preemptible_batch(backbone, store):
    """With preemption on, a batch is submitted preemptible; a request of a less-served tenant that
    arrives while it runs goes to `Engine.preempt` and is answered before the running batch ends."""

    async def scenario():
        fake = FakeExecutor(hold=True)
        sched = await started(backbone, store, fake, max_batch_size=64, preempt=True)
        try:
            heavy = asyncio.ensure_future(sched.submit("acme", "a", images(8)))
            await until(lambda: len(fake.held) == 1)
            light = await asyncio.wait_for(sched.submit("beta", "b", images(1)), 10)
            assert not heavy.done()  # still running: the light request overtook it
            assert fake.submitted[0][1] is True  # the heavy batch was preemptible
            assert fake.preempted == [[slot_of(sched, "beta", "b")]]
            assert light.predictions is not None
            assert light.predictions[0][0].index == slot_of(sched, "beta", "b") % C
            fake.release()
            assert (await heavy).batch_size == 8
        finally:
            await sched.close()

    asyncio.run(scenario())
