"""The engine core as an API-server process sees it: `Core` over the core's Unix socket.

Each request's decoded images (and the JPEGs left to the core's GPU decoder) go into this process's
shared-memory arena (`server.core.arena`) and a small frame names where they lie
(`server.core.protocol`); the answer frees the block. If the core goes away, every request waiting
on it fails with 503 and `alive` turns false (/healthz 503); the supervisor then stops the server with
exit status 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.core import protocol as p
from server.core.arena import Arena
from server.core.handle import Admission, Core, EngineInfo, TaskState
from server.engine.bank import BankStats
from server.engine.batch import Output
from server.errors import DeadlineExceeded, Unavailable
from server.metrics import LiveStats, TaskCounters
from server.preprocess import Pixels
from server.scheduler.types import Result

log = logging.getLogger(__name__)

CORE_GONE = "the engine core exited: restart the server"
# The core enforces each request's deadline; this much later the API server gives up on its own.
DEADLINE_GRACE_S = 5.0


@dataclass(frozen=True)
class CoreAddress:
    """What an API-server process needs to reach its engine core (from the supervisor)."""

    socket: str  # the core's Unix socket
    arena: str  # this process's image arena: a file on tmpfs that it creates
    arena_bytes: int
    rate_table: str  # the shared rate-limit buckets (`server.ratelimit.SharedRateLimiter`)


# Admission without asking the core: while the queues, as the core last reported them (at most FRESH_S
# ago) plus this API server's own requests since, stay under MARGIN of every bound. The other API
# servers' newest requests are what the margin is for; the core checks the bounds again in any case.
FRESH_S = 1.0
MARGIN = 0.5


class _Reservation(Admission):
    def __init__(
        self, client: CoreClient, rid: int, tenant: str, n: int, bound: int | None, reserved: bool
    ) -> None:
        super().__init__(tenant, n, bound)
        self.client, self.rid, self.reserved = client, rid, reserved

    def _release(self) -> None:
        if self.reserved:
            self.client._send(p.RELEASE, self.rid)
        self.client._settled(self.rid)


class CoreClient(Core):
    def __init__(self, arena: Arena) -> None:
        self.arena = arena
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}  # request id -> its answer
        self._blocks: dict[int, tuple[int, int]] = {}  # request id -> its arena block, until answered
        self._conn: p.Framed | None = None
        self._alive = False
        self.max_queue_images = 0  # the core's bound on all queued images (WELCOME)
        # Admission without a round trip (`admit`): the queue state each answer carried, per tenant, and
        # the images this process admitted and has not had answered yet.
        self._seen: dict[str, tuple[int, int, float]] = {}  # tenant -> (its queued, all queued, when)
        self._admitted: dict[int, tuple[str, int]] = {}  # request id -> (tenant, images), until answered
        self._outstanding: dict[str, int] = {}
        self._outstanding_total = 0
        self.on_lost: Callable[[], None] | None = None  # called once if the core goes away

    @classmethod
    async def connect(cls, address: CoreAddress) -> CoreClient:
        arena = Arena(address.arena, address.arena_bytes, create=True)
        client = cls(arena)
        try:
            loop = asyncio.get_running_loop()
            _, client._conn = await loop.create_unix_connection(
                lambda: p.Framed(client._on_message, client._on_lost), address.socket
            )
            client._alive = True
            hello = {"pid": os.getpid(), "arena": arena.path, "arena_bytes": arena.size}
            welcome = await client._ask(p.HELLO, p.encode_json(hello))
        except BaseException:
            client._close()
            raise
        client.info = EngineInfo.from_json(welcome["info"])
        client.max_queue_images = int(welcome["max_queue_images"])
        return client

    # --- Core ------------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._alive

    @property
    def ready(self) -> bool:
        return self._alive  # the core accepts API servers only once it has warmed up

    async def admit(self, tenant: str, n: int, tenant_max_queued: int | None) -> Admission:
        """Far from the bounds (as last seen), admitted here; else the core holds the room (RESERVE),
        or refuses now, before any decoding."""
        rid = next(self._ids)
        reserved = not self._room_known(tenant, n, tenant_max_queued)
        self._admitted[rid] = (tenant, n)
        self._outstanding[tenant] = self._outstanding.get(tenant, 0) + n
        self._outstanding_total += n
        if reserved:
            try:
                await self._ask(p.RESERVE, p.encode_reserve(tenant, n, tenant_max_queued), rid)
            except BaseException:
                # Refused, or cancelled (client gone) with the OK on its way: the room is given back.
                self._send(p.RELEASE, rid)
                self._settled(rid)
                raise
        return _Reservation(self, rid, tenant, n, tenant_max_queued, reserved)

    def _room_known(self, tenant: str, n: int, bound: int | None) -> bool:
        seen = self._seen.get(tenant)
        if seen is None or time.monotonic() - seen[2] > FRESH_S:
            return False
        queued, total, _ = seen
        if bound is not None and queued + self._outstanding.get(tenant, 0) + n > bound * MARGIN:
            return False
        return total + self._outstanding_total + n <= self.max_queue_images * MARGIN

    def _settled(self, rid: int) -> None:
        """A request is answered or released: its images no longer count as this process's."""
        admitted = self._admitted.pop(rid, None)
        if admitted is not None:
            tenant, n = admitted
            self._outstanding_total -= n
            left = self._outstanding[tenant] - n
            if left:
                self._outstanding[tenant] = left
            else:
                del self._outstanding[tenant]

    async def run(
        self,
        admission: Admission,
        task_id: str,
        images: Pixels,
        outputs: tuple[Output, ...],
        *,
        top_k: int,
        timeout_s: float,
        weight: float,
    ) -> list[Result]:
        assert isinstance(admission, _Reservation) and admission.held
        n, _, h, w = images.images.shape
        run = p.Run(0, n, h, w, top_k, timeout_s, weight, outputs, admission.tenant, task_id, admission.reserved,
                    admission.tenant_max_queued, tuple((i, len(data)) for i, data in images.jpegs))  # fmt: skip
        nbytes = run.nbytes
        try:  # the arena full of other requests' images: wait within the request's deadline
            offset = await asyncio.wait_for(self.arena.take(nbytes), timeout_s)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"request did not finish within {timeout_s:.1f}s") from None
        self._write(offset, images)
        run = dataclasses.replace(run, offset=offset)
        rid = admission.rid
        try:
            answer = self._ask(p.RUN, run.encode(), rid)
        except BaseException:
            self.arena.free(offset, nbytes)
            raise
        admission.held = False  # the core turns the reservation into queued images
        self._blocks[rid] = (offset, nbytes)  # until the answer: no answer can come before the await
        try:
            return await asyncio.wait_for(answer, timeout_s + DEADLINE_GRACE_S)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"request did not finish within {timeout_s:.1f}s") from None
        finally:
            if rid in self._waiting:  # cancelled (client gone) or timed out: the core forgets it too
                self._send(p.CANCEL, rid)

    def _write(self, offset: int, images: Pixels) -> None:
        """The block's contents (`protocol.Run`): the decoded images, then each JPEG's bytes."""
        self.arena.view(offset, tuple(images.images.shape)).copy_(images.images)
        at = offset + images.images.numel()
        for _, data in images.jpegs:
            self.arena.view(at, (len(data),)).numpy()[:] = np.frombuffer(data, dtype=np.uint8)
            at += len(data)

    async def task_changed(self, tenant: str, task_id: str, version: int) -> None:
        await self._call("task_changed", tenant=tenant, task_id=task_id, version=version)

    async def task_deleted(self, tenant: str, task_id: str) -> None:
        await self._call("task_deleted", tenant=tenant, task_id=task_id)

    async def task_state(self, tenant: str, task_ids: list[str]) -> list[TaskState]:
        states = await self._call("task_state", tenant=tenant, task_ids=task_ids)
        return [TaskState(s["resident_versions"], TaskCounters(**s["usage"])) for s in states]

    async def live(self) -> LiveStats:
        d = await self._call("live")
        return LiveStats(BankStats(**d["bank"]), d["queued_images"], d["in_flight"])

    def on_death(self, hook: Callable[[], None] | None) -> None:
        self.on_lost = hook

    async def stop(self, timeout_s: float) -> None:
        self._close()

    # --- messages --------------------------------------------------------------------------------

    async def _call(self, op: str, **args: Any) -> Any:
        return await self._ask(p.CALL, p.encode_json({"op": op, **args}))

    def _ask(self, kind: int, payload: bytes, rid: int | None = None) -> asyncio.Future[Any]:
        if not self._alive:
            raise Unavailable(CORE_GONE)
        rid = next(self._ids) if rid is None else rid
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        self._send(kind, rid, payload)
        return fut

    def _send(self, kind: int, rid: int, payload: bytes = b"") -> None:
        if self._conn is not None:
            self._conn.send(kind, rid, payload)

    def _on_message(self, kind: int, rid: int, payload: memoryview) -> None:
        block = self._blocks.pop(rid, None)
        if block is not None:  # answered: the core no longer reads the request's images
            self.arena.free(*block)
        fut = self._waiting.pop(rid, None)
        try:
            if kind in (p.OK, p.RESULT, p.ERROR):
                (queued, total), payload = p.decode_state(payload)
                admitted = self._admitted.get(rid)
                if admitted is not None:
                    if queued != p.UNKNOWN:
                        self._seen[admitted[0]] = (queued, total, time.monotonic())
                    if kind != p.OK:  # the request's last answer (an OK is a RESERVE's: its RUN follows)
                        self._settled(rid)
            if fut is None or fut.done():
                return  # cancelled meanwhile
            if kind == p.ERROR:
                fut.set_exception(p.decode_error(payload))
            elif kind == p.RESULT:
                fut.set_result(p.decode_results(payload))
            elif kind in (p.WELCOME, p.ANSWER):
                fut.set_result(p.decode_json(payload))
            else:
                fut.set_result(None)  # OK
        except Exception as e:  # a malformed answer fails its request, not the connection
            if fut is not None and not fut.done():
                fut.set_exception(e)

    def _on_lost(self, exc: Exception | None) -> None:
        was_alive, self._alive = self._alive, False
        waiting, self._waiting = self._waiting, {}
        for fut in waiting.values():
            if not fut.done():
                fut.set_exception(Unavailable(CORE_GONE))
        for offset, nbytes in self._blocks.values():
            self.arena.free(offset, nbytes)
        self._blocks.clear()
        for rid in list(self._admitted):
            self._settled(rid)
        if was_alive and self._conn is not None:
            log.error("lost the engine core (%s)", exc or "connection closed")
            if self.on_lost is not None:
                self.on_lost()

    def _close(self) -> None:
        self._alive = False
        if self._conn is not None and self._conn.transport is not None:
            conn, self._conn = self._conn, None
            conn.transport.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.arena.path)
