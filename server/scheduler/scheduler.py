"""Continuous cross-task batching (asyncio front, engine in worker threads).

- Requests wait in per-tenant FIFO queues; a batch is filled by weighted fair selection across tenants
  (`FairQueues`), so one tenant's burst cannot starve the others, and per-tenant queue bounds turn a
  flood into 429s for the flooding tenant only.
- Batching is continuous: a batch is dispatched as soon as the engine can take one; while it computes,
  the queues grow and the next batch is filled from everything waiting (optionally waiting up to
  `max_batch_delay_s` for a fuller batch when the engine is idle).
- Mixed batches: requests of different tasks share one forward pass (the engine gathers each sample's
  prompts and head). `per_task` mode restricts a batch to one task — the baseline the benchmarks compare.
- Before a request joins a batch its task's current version is resident (`Residency`); the request is
  bound to that slot, so it runs wholly on one version and the slot cannot be evicted under it.
- Up to `pipeline_depth` batches are in flight: on CUDA the engine launches batch k+1 while batch k
  computes, overlapping host preparation with device compute.
- The engine is one interface (`Engine.submit` / `Engine.preempt`, each a Future of the batch's
  result); which executor runs the batches — an engine thread, an engine process, a CUDA device — is
  the engine's business, chosen when it starts.
- Preemption on CPU: a forward pass occupies the only engine thread, so a light tenant's request that
  arrives just after a heavy tenant's full batch started would wait for all of it. With `preempt`, a
  request that fair queuing ranks at or before the running batch (it arrived later, from a less-served
  tenant) runs between two transformer blocks of that batch: it waits for one block, not one batch.
  When nobody overtakes this costs a flag check per block (splitting batches into smaller ones
  instead cost ~20% of CPU throughput).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import torch

from prompt_store.base import PromptStore
from server.engine.batch import EngineBatch, EngineResult, Output
from server.engine.engine import Engine
from server.errors import DeadlineExceeded, InvalidRequest, Overloaded, ServingError, Unavailable
from server.scheduler.fair import FairQueues
from server.scheduler.residency import Ready, Residency
from server.scheduler.types import Prediction, Request, Result

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 5  # labels per image when a request names none (/v1 and /v2 alike)


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 64  # images per forward pass
    max_batch_delay_s: float = 0.0  # wait this long for a fuller batch when the engine is idle
    max_queue_images: int = 4096  # images waiting across all tenants before 429
    batching: Literal["mixed", "per_task"] = "mixed"
    pipeline_depth: int = 1  # batches in flight (2 on CUDA overlaps preparation with compute)
    loader_threads: int = 4  # store reads + artifact validation
    version_ttl_s: float = 2.0  # how stale a task's current-version view may get (replicas)
    preempt: bool = False  # CPU: later requests of less-served tenants may run between blocks


@dataclass
class _Planned:
    requests: list[tuple[Request, int]]  # (request, slot)
    batch: EngineBatch
    tag: float  # fair-queuing start tag of its last request: later arrivals ranked <= it may overtake
    # Set when handed to the engine to run between two blocks of the running batch (`Engine.preempt`;
    # it resolves with that run's result); None: the batch runs on its own.
    handed_over: Future[EngineResult] | None = None


class SchedulerHooks:
    """Observation points for metrics; the default does nothing."""

    def queue_wait(self, seconds: float) -> None: ...
    def batch(self, size: int, compute_s: float, tasks: int) -> None: ...
    def task_load(self, seconds: float) -> None: ...
    def rejected(self, reason: str) -> None: ...


class Scheduler:
    def __init__(
        self,
        engine: Engine,
        store: PromptStore,
        config: SchedulerConfig,
        hooks: SchedulerHooks | None = None,
    ) -> None:
        self.engine, self.config = engine, config
        self.hooks = hooks or SchedulerHooks()
        self._loader_ex = ThreadPoolExecutor(config.loader_threads, thread_name_prefix="vpt-loader")
        self.residency = Residency(
            engine,
            store,
            loader=self._loader_ex,
            on_change=self._wake,
            on_failed=self._fail_task,
            version_ttl_s=config.version_ttl_s,
            observe_load=self.hooks.task_load,
        )
        self._fq = FairQueues()
        self._decoding: dict[str, int] = {}  # images admitted and being decoded, per tenant
        self._decoding_total = 0
        self._in_flight = 0
        self._event = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()
        self._running_tag: float | None = None  # start tag of the preemptible CPU batch computing now
        self._preempting = False  # a batch handed to `Engine.preempt` has not finished yet
        self._accepting = False
        self._closing = False
        self.batches_run = 0

    # --- public API ---------------------------------------------------------------------------------

    async def start(self) -> None:
        self._accepting = True
        self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="vpt-scheduler")

    @property
    def queued_images(self) -> int:
        return self._fq.total_images

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def queued_images_of(self, tenant: str) -> int:
        """The tenant's images waiting in its queue."""
        return self._fq.queued_images(tenant)

    async def submit(
        self,
        tenant: str,
        task_id: str,
        images: torch.Tensor,
        *,
        output: Output = "classify",
        top_k: int = DEFAULT_TOP_K,
        timeout_s: float = 30.0,
        weight: float = 1.0,
        tenant_max_queued: int | None = None,
    ) -> Result:
        """Queue one request (n images of one task) and wait for its result.

        `weight` is the tenant's share under contention; `tenant_max_queued` bounds its queued images.
        Cancelling the awaiting coroutine (client gone) removes the request from its queue.
        """
        if not self._accepting:
            self.hooks.rejected("shutting_down")
            raise Unavailable("server is shutting down")
        n = int(images.shape[0])
        if n > self.config.max_batch_size:
            raise InvalidRequest(f"{n} images exceed the max batch size {self.config.max_batch_size}")
        self._check_room(tenant, n, tenant_max_queued)
        fut: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        req = Request(tenant, task_id, images, output, top_k, time.monotonic() + timeout_s, fut)
        self._enqueue(req, weight)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout=timeout_s)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"request did not finish within {timeout_s:.1f}s") from None
        finally:
            if not fut.done():
                fut.cancel()  # frees its place; _take skips cancelled requests
            self._wake()

    # --- task changes (routes): what the scheduler's residency and the engine's bank must know -----

    def task_changed(self, tenant: str, task_id: str, version: int) -> None:
        """A task's current version changed through this server (upload, replace, rollback): requests
        from now on run on `version`."""
        self.residency.set_current(tenant, task_id, version)

    def task_deleted(self, tenant: str, task_id: str) -> None:
        """A task was deleted: its resident versions free once drained; new requests find it gone."""
        self.residency.forget(tenant, task_id)

    def resident_versions(self, tenant: str, task_id: str) -> list[int]:
        """The task's versions in the engine's bank now."""
        return self.engine.bank.resident_versions(tenant, task_id)

    @contextlib.contextmanager
    def admit(self, tenant: str, n: int, tenant_max_queued: int | None) -> Iterator[None]:
        """Hold room for `n` images while the caller decodes them, so a request the queue bounds
        would refuse is refused before any decode work (a flood must not cost decode CPU)."""
        self._check_room(tenant, n, tenant_max_queued, self._decoding.get(tenant, 0), self._decoding_total)
        self._decoding[tenant] = self._decoding.get(tenant, 0) + n
        self._decoding_total += n
        try:
            yield
        finally:
            self._decoding[tenant] -= n
            self._decoding_total -= n
            if not self._decoding[tenant]:
                del self._decoding[tenant]

    def _check_room(
        self, tenant: str, n: int, tenant_max_queued: int | None, tenant_extra: int = 0, total_extra: int = 0
    ) -> None:
        held = self._fq.queued_images(tenant) + tenant_extra
        if tenant_max_queued is not None and held + n > tenant_max_queued:
            self.hooks.rejected("tenant_queue_full")
            raise Overloaded(f"tenant {tenant!r} has {held} images waiting (limit {tenant_max_queued})")
        total = self._fq.total_images + total_extra
        if total + n > self.config.max_queue_images:
            self.hooks.rejected("queue_full")
            raise Overloaded(f"server queue is full ({total} images waiting)")

    async def drain(self, timeout_s: float = 30.0) -> None:
        """Stop accepting; wait until queued and in-flight work is done (graceful shutdown)."""
        self._accepting = False
        deadline = time.monotonic() + timeout_s
        while (self._fq or self._in_flight) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        self._accepting = False
        self._closing = True
        self._wake()
        if self._loop_task:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        await self.residency.close()
        for r in list(self._fq.all_requests()):
            self._fq.remove(r)
            if not r.done:
                r.future.set_exception(Unavailable("server is shutting down"))
        self._loader_ex.shutdown(wait=True, cancel_futures=True)

    # --- queues -------------------------------------------------------------------------------------

    def _enqueue(self, req: Request, weight: float) -> None:
        self._fq.push(req, weight)
        req.future.add_done_callback(lambda f, r=req: self._on_request_done(r))
        self._wake()

    def _on_request_done(self, req: Request) -> None:
        # A request cancelled (client gone, timeout) while still queued gives back its place at once.
        self._fq.remove(req)

    def _wake(self) -> None:
        self._event.set()

    # --- the loop -----------------------------------------------------------------------------------

    async def _run(self) -> None:
        # The `_closing` flag, not only cancellation, ends the loop: on Python < 3.12 `wait_for` can
        # swallow a cancel that arrives as the event fires, and close() would then wait forever.
        while not self._closing:
            self._event.clear()
            try:
                if self._in_flight < self.config.pipeline_depth and await self._step():
                    continue
                self._preempt_running_batch()
            except Exception:
                # A bug here must not stop serving: log it and keep scheduling.
                log.exception("scheduler step failed")
            # Every state change (enqueue, cancel, load done, batch done) sets the event; the timeout
            # is only a safety net. Deadlines need no timer: `submit` times out on its own.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._event.wait(), 0.5)

    async def _step(self) -> bool:
        """Plan and dispatch one batch; False when nothing can run now."""
        planned = self._plan()
        if planned is None:
            return False
        if (
            self.config.max_batch_delay_s > 0
            and self._in_flight == 0
            and planned.batch.images.shape[0] < self.config.max_batch_size
        ):
            planned = await self._maybe_wait_for_more(planned)
        if planned is not None:  # None: its requests were cancelled while it waited
            self._dispatch(planned)
        return True

    async def _maybe_wait_for_more(self, planned: _Planned) -> _Planned | None:
        """Engine idle, batch not full: give it `max_batch_delay_s` to fill up, then replan."""
        self._unplan(planned)
        oldest = min(r.enqueued for r, _ in planned.requests)
        wait = self.config.max_batch_delay_s - (time.monotonic() - oldest)
        if wait > 0:
            await asyncio.sleep(wait)
        return self._plan()

    def _plan(self, before: float | None = None) -> _Planned | None:
        """Fill a batch with requests whose tasks are resident, least-served tenant (by weight) first.

        `before` admits only tenants whose next request's start tag is at most that: the requests
        that may overtake a running batch."""
        cap = self.config.max_batch_size
        taken: list[tuple[Request, int]] = []
        size = 0
        only_task: tuple[str, str] | None = None
        output: Output | None = None
        now = time.monotonic()
        exhausted: set[str] = set()  # tenants with nothing runnable for this batch
        while size < cap:
            tenant = next((t for t in self._fq.tenants_by_priority() if t not in exhausted), None)
            if tenant is None or (before is not None and self._fq.start_tag(tenant) > before):
                break  # by priority: the tenants after this one start later still
            req, slot = self._take(tenant, now, cap - size, only_task, output)
            if req is None:
                exhausted.add(tenant)
                continue
            self._fq.take(req)
            taken.append((req, slot))
            size += req.n
            output = req.output
            if self.config.batching == "per_task":
                only_task = req.task
        if not taken:
            return None
        for _, slot in taken:
            self.engine.bank.acquire(slot, 1)
        return _Planned(taken, self._engine_batch(taken), self._fq.clock)

    def _engine_batch(self, taken: list[tuple[Request, int]]) -> EngineBatch:
        infos, slots, imgs = [], [], []
        for req, slot in taken:
            info = self.engine.bank.info(slot)
            infos += [info] * req.n
            slots += [slot] * req.n
            imgs.append(req.images)
        images = self.engine.stage(imgs)
        top_k = max(r.top_k for r, _ in taken)
        return EngineBatch(images, slots, infos, taken[0][0].output, top_k)

    def _unplan(self, planned: _Planned) -> None:
        """Put planned requests back at the front of their queues (keeps FIFO order and charges)."""
        for req, slot in reversed(planned.requests):
            self.engine.bank.release(slot, 1)
            self._fq.push_front(req)

    def _take(
        self,
        tenant: str,
        now: float,
        room: int,
        only_task: tuple[str, str] | None,
        output: Output | None,
    ) -> tuple[Request | None, int]:
        """First request of this tenant that can run now; fails expired ones on the way (unloadable
        ones are failed by the residency, through `_fail_task`).

        Walks the tenant's queue in place (no copy) and resolves each task at most once per walk, so a
        long queue waiting on one cold task costs one dictionary lookup per request."""
        dead: list[Request] = []
        waiting: set[tuple[str, str]] = set()
        found: tuple[Request | None, int] = (None, -1)
        for req in self._fq.queue(tenant):
            if req.done or now > req.deadline:  # cancelled by its client, failed, or expired
                dead.append(req)
                continue
            if req.n > room or (only_task and req.task != only_task) or (output and req.output != output):
                continue
            if req.task in waiting:
                continue
            state = self.residency.resolve(req.task)
            if isinstance(state, Ready):
                found = (req, state.slot)
                break
            # Its task is loading: later requests of this tenant (other tasks) may go first.
            waiting.add(req.task)
        for req in dead:
            self._fq.remove(req)
            if not req.done:
                self.hooks.rejected("deadline")
                req.future.set_exception(DeadlineExceeded("request expired in the queue"))
        return found

    def _fail_task(self, task: tuple[str, str], error: ServingError) -> None:
        """Fail every queued request for a task (not found, invalid artifact, store down)."""
        for req in self._fq.requests(task[0]):
            if req.task != task:
                continue
            self._fq.remove(req)
            if not req.done:
                req.future.set_exception(error)

    def _dispatch(self, planned: _Planned) -> None:
        self._start(planned)
        self._spawn(self._execute(planned))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._batches.add(task)  # keep a reference until done (asyncio holds only weak ones)
        task.add_done_callback(self._batches.discard)

    def _start(self, planned: _Planned) -> None:
        """Count a planned batch as in flight (at once: the loop must not dispatch past the depth)."""
        self._in_flight += 1
        now = time.monotonic()
        for req, _ in planned.requests:
            req.dispatched = now
            self.hooks.queue_wait(now - req.enqueued)

    async def _execute(self, planned: _Planned) -> None:
        """Run a started batch and deliver its results."""
        try:
            await self._compute(planned.requests, planned.batch, planned.tag, planned.handed_over)
        except Exception as e:
            self._finish(planned, e)
        else:
            self._finish(planned, None)
        finally:
            if planned.handed_over is not None:
                self._preempting = False

    def _finish(self, planned: _Planned, error: Exception | None) -> None:
        """A started batch is over: fail what it did not answer (on error), release its slots."""
        if error is not None:
            # Only this batch's requests fail; the next batch runs as usual.
            log.error("batch of %d images failed", planned.batch.images.shape[0], exc_info=error)
            self.hooks.rejected("engine_error")
            for req, _ in planned.requests:
                if not req.done:
                    req.future.set_exception(Unavailable(f"inference failed: {type(error).__name__}"))
        for _, slot in planned.requests:
            self.engine.bank.release(slot, 1)
        self._in_flight -= 1
        self.batches_run += 1
        self._wake()

    async def _compute(
        self,
        part: list[tuple[Request, int]],
        batch: EngineBatch,
        tag: float,
        handed_over: Future[EngineResult] | None = None,
    ) -> None:
        try:
            if handed_over is not None:  # the engine runs it between two blocks of the running batch
                result = await asyncio.wrap_future(handed_over)
            elif self.config.preempt:
                result = await self._run_preemptible(batch, tag)
            else:
                result = await asyncio.wrap_future(self.engine.submit(batch))
        except torch.OutOfMemoryError:
            if len(part) == 1:
                raise
            # Out of device memory (the engine gave its cached blocks back): retry the two halves one
            # after the other.
            log.warning("out of memory on a batch of %d images; splitting it", batch.images.shape[0])
            self.hooks.rejected("oom_split")
            half = len(part) // 2
            for sub in (part[:half], part[half:]):
                await self._compute(sub, self._engine_batch(sub), tag)
            return
        self._deliver(part, batch, result)

    async def _run_preemptible(self, batch: EngineBatch, tag: float) -> EngineResult:
        """CPU: run a batch that the requests ranked at or before `tag` may overtake (see module doc)."""
        self._running_tag = tag
        self._wake()  # requests already waiting may overtake it
        try:
            return await asyncio.wrap_future(self.engine.submit(batch, preemptible=True))
        finally:
            self._running_tag = None

    def _preempt_running_batch(self) -> None:
        """While a preemptible batch runs: plan the requests that may overtake it and hand them to
        the engine (`Engine.preempt`), which runs them at the batch's next block boundary; they are
        delivered and finished like any batch (`_execute`). One preempting batch at a time."""
        tag = self._running_tag
        if tag is None or self._preempting:
            return
        planned = self._plan(before=tag)
        if planned is None:
            return
        self._start(planned)
        try:
            planned.handed_over = self.engine.preempt(planned.batch)
        except Exception as e:  # e.g. the engine process died: these requests fail like a failed batch
            self._finish(planned, e)
            return
        self._preempting = True
        self._spawn(self._execute(planned))

    def _deliver(self, part: list[tuple[Request, int]], batch: EngineBatch, result: EngineResult) -> None:
        B = batch.images.shape[0]
        self.hooks.batch(B, result.compute_s, len({r.task for r, _ in part}))
        row = 0
        for req, _ in part:
            info = batch.infos[row]
            rows = slice(row, row + req.n)
            row += req.n
            if req.done:
                continue
            preds = feats = None
            if req.output == "embed":
                assert result.features is not None
                feats = result.features[rows].tolist()
            else:
                assert result.scores is not None and result.indices is not None
                k = min(req.top_k, info.num_classes)
                scores, idx = result.scores[rows, :k].tolist(), result.indices[rows, :k].tolist()
                preds = [
                    [Prediction(info.labels[i], i, s) for s, i in zip(srow, irow, strict=True)]
                    for srow, irow in zip(scores, idx, strict=True)
                ]
            req.future.set_result(
                Result(
                    version=info.key.version,
                    predictions=preds,
                    features=feats,
                    queue_s=req.dispatched - req.enqueued,
                    compute_s=result.compute_s,
                    batch_size=B,
                )
            )
