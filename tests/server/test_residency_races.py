"""Store answers that predate this server's own change (upload, rollback) do not overwrite it.

A lookup or a load runs in a loader thread. One begun before an upload or rollback through this
server (`Residency.set_current`) can answer after it, with what the store held before: NotFound for a
task just created, the version just replaced, a failure to load a version no longer current. Those
answers must neither fail the queued requests nor revert the version.

Real scheduler, engine and local store; the store only answers late when told to (`HeldStore`), so
each interleaving is forced, not hoped for.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

import pytest
import torch

from prompt_store.local import LocalStore
from server.engine.engine import Engine
from server.scheduler.scheduler import Scheduler, SchedulerConfig
from tests.server.helpers import BACKBONE_SPEC, artifact_bytes
from vpt.hub import load_backbone

# The event loop is idle while a test waits: an answer the loader thread has given reaches the
# residency within a few loop iterations (microseconds); this is orders of magnitude more.
SETTLE_S = 0.1


@dataclass
class Hold:
    """One store call held back: it reads the store at once, then answers once `release` is set."""

    read: threading.Event = field(default_factory=threading.Event)  # the call has read the store
    release: threading.Event = field(default_factory=threading.Event)  # set by the test
    answered: threading.Event = field(default_factory=threading.Event)  # returned or raised


class HeldStore(LocalStore):
    """A local store whose next `current_version`, or `get` of one version, can be held: it reads the
    store when called and answers when released, as a slow store (S3 under load) delivers an answer
    read before a change after it. Only the timing is the test's; every answer is the store's own."""

    def __init__(self, root) -> None:
        super().__init__(root)
        self._holds: dict[str, Hold] = {}
        self._made: list[Hold] = []

    def hold(self, call: str) -> Hold:
        """Hold the next `call`: "current_version" or "get v<N>"."""
        self._holds[call] = h = Hold()
        self._made.append(h)
        return h

    def release_all(self) -> None:
        """A failed test leaves no loader thread waiting."""
        for h in self._made:
            h.release.set()

    def current_version(self, tenant, task_id):
        return self._answer("current_version", super().current_version, tenant, task_id)

    def get(self, tenant, task_id, version=None):
        return self._answer(f"get v{version}", super().get, tenant, task_id, version)

    def _answer(self, call, read, *args):
        h = self._holds.pop(call, None)
        if h is None:
            return read(*args)
        try:
            return read(*args)
        finally:
            h.read.set()
            assert h.release.wait(10), f"{call} was never released"
            h.answered.set()


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(BACKBONE_SPEC)


@pytest.fixture
def store(tmp_path):
    return HeldStore(tmp_path / "store")


def images() -> torch.Tensor:
    return torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)


async def started(backbone, store, **cfg) -> Scheduler:
    engine = Engine(backbone, bank_slots=8, max_prompt_length=8, max_classes=8)
    sched = Scheduler(engine, store, SchedulerConfig(**cfg))
    await sched.start()
    return sched


async def reached(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, 10)


async def answer_late(h: Hold) -> None:
    """Let a held call answer, and the residency take its answer in."""
    h.release.set()
    await reached(h.answered)
    await asyncio.sleep(SETTLE_S)


def test_not_found_from_before_an_upload_does_not_fail_the_request(backbone, store):
    """A request for a task not yet created starts a lookup, which finds nothing; before its answer
    arrives the task is uploaded through this server. The request is served at the new version."""

    async def scenario():
        lookup, load = store.hold("current_version"), store.hold("get v1")
        sched = await started(backbone, store)
        try:
            request = asyncio.create_task(sched.submit("acme", "new", images()))
            await reached(lookup.read)  # the store has no such task yet
            # The upload route: the store first, then the residency.
            store.put("acme", "new", artifact_bytes(backbone, P=2, mode="deep", C=3, seed=1))
            sched.residency.set_current("acme", "new", 1)
            await answer_late(lookup)  # NotFound, from before the upload
            assert not request.done(), request.exception()
            assert sched.residency.knows("acme", "new")  # the entry stays
            load.release.set()
            assert (await request).version == 1
        finally:
            store.release_all()
            await sched.close()

    asyncio.run(scenario())


def test_a_version_from_before_an_upload_does_not_revert_it(backbone, store):
    """A version check due after the TTL reads v1; v2 is uploaded through this server before the
    check answers. The next request runs on v2, not on v1 for another TTL."""
    ttl = 0.5

    async def scenario():
        store.put("acme", "t", artifact_bytes(backbone, P=2, mode="deep", C=3, seed=1))
        sched = await started(backbone, store, version_ttl_s=ttl)
        try:
            assert (await sched.submit("acme", "t", images())).version == 1
            lookup = store.hold("current_version")
            await asyncio.sleep(ttl + 0.05)
            # Served from the bank (at most one TTL stale); starts the version check, held after it
            # reads v1.
            assert (await sched.submit("acme", "t", images())).version == 1
            await reached(lookup.read)
            store.put("acme", "t", artifact_bytes(backbone, P=2, mode="deep", C=3, seed=2))
            sched.residency.set_current("acme", "t", 2)
            await answer_late(lookup)  # v1, from before the upload
            assert (await sched.submit("acme", "t", images())).version == 2
        finally:
            store.release_all()
            await sched.close()

    asyncio.run(scenario())


def test_a_failed_load_of_a_replaced_version_does_not_fail_the_request(backbone, store):
    """v1 has more classes than this server's bank takes, so loading it fails; while it loads, a fixed
    v2 is uploaded through this server. The queued request is v2's: served, not failed with v1's error."""

    async def scenario():
        store.put("acme", "t", artifact_bytes(backbone, P=2, mode="deep", C=16, seed=1))  # max_classes=8
        load_v1, load_v2 = store.hold("get v1"), store.hold("get v2")
        sched = await started(backbone, store)
        try:
            request = asyncio.create_task(sched.submit("acme", "t", images()))
            await reached(load_v1.read)
            store.put("acme", "t", artifact_bytes(backbone, P=2, mode="deep", C=3, seed=2))
            sched.residency.set_current("acme", "t", 2)
            await answer_late(load_v1)  # v1 too large for the bank: its load fails
            assert not request.done(), request.exception()
            load_v2.release.set()
            assert (await request).version == 2
        finally:
            store.release_all()
            await sched.close()

    asyncio.run(scenario())
