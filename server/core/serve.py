"""The engine-core side of the API servers' sockets: each connection's requests go to the one
`LocalCore` (engine, bank, residency, fair scheduler) this process owns, so fairness, queue bounds,
deadlines and task versions hold across every API server.

A request's images are read in place from its API server's arena (`server.core.arena`): the scheduler
copies them into the batch when the batch is built (the JPEGs left to the GPU decoder are decoded
first). Every RUN is answered exactly once (RESULT or ERROR, a cancelled one too), which is what lets
the API server reuse the block.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from server.core import protocol as p
from server.core.arena import Arena
from server.core.handle import Admission
from server.core.local import LocalCore
from server.errors import InternalError, InvalidRequest, ServingError, Unavailable
from server.preprocess import Pixels

log = logging.getLogger(__name__)


class CoreServer:
    """Serves `core` on a Unix socket at `path` (mode 0600: only this user's processes connect)."""

    def __init__(self, core: LocalCore, path: str) -> None:
        self.core, self.path = core, path
        self._server: asyncio.AbstractServer | None = None
        self.connections: set[_Connection] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        old = os.umask(0o177)
        try:
            self._server = await loop.create_unix_server(lambda: _Connection(self), self.path)
        finally:
            os.umask(old)

    async def close(self) -> None:
        """Stop accepting API servers; the connected ones keep their requests until they hang up."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def drop_all(self, reason: str) -> None:
        """Fail every connection (the engine died): each API server answers its requests with 503."""
        for conn in list(self.connections):
            conn.abort(reason)


class _Connection(p.Framed):
    def __init__(self, server: CoreServer) -> None:
        super().__init__(self._on_message, self._on_lost)
        self.server, self.core = server, server.core
        self.arena: Arena | None = None
        self.peer = "?"
        self._tasks: dict[int, asyncio.Task[None]] = {}  # running RUNs and CALLs, by request id
        self._unanswered: set[int] = set()  # RUNs and CALLs started and not answered yet
        self._held: dict[int, Admission] = {}  # RESERVEd room not yet RUN or RELEASEd

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self.server.connections.add(self)

    def abort(self, reason: str) -> None:
        log.info("dropping API server %s: %s", self.peer, reason)
        if self.transport is not None:
            self.transport.abort()

    # --- messages --------------------------------------------------------------------------------

    def _on_message(self, kind: int, rid: int, payload: memoryview) -> None:
        try:
            if kind == p.RUN:
                self._start(rid, self._run(rid, p.Run.decode(payload)))
            elif kind == p.RESERVE:
                self._reserve(rid, *p.decode_reserve(payload))
            elif kind == p.RELEASE:
                held = self._held.pop(rid, None)
                if held is not None:
                    held.release()
            elif kind == p.CANCEL:
                task = self._tasks.get(rid)
                if task is not None:
                    task.cancel()  # answered as cancelled: by the task, or by `_done` if it never ran
                else:
                    # Answered already (the answer crossed the CANCEL), or never started: one more
                    # answer costs the API server nothing and guarantees it frees the request's block.
                    self._answer(p.ERROR, rid, self._state(None) + p.encode_error(Unavailable("cancelled")))
            elif kind == p.CALL:
                self._start(rid, self._call(rid, p.decode_json(payload)))
            elif kind == p.HELLO:
                self._hello(rid, p.decode_json(payload))
            else:
                raise ValueError(f"unknown message kind {kind}")
        except ServingError as e:
            self._error(rid, e)
        except Exception as e:  # a malformed message: the peer is broken, not the core
            log.exception("bad message from API server %s", self.peer)
            self._error(rid, InvalidRequest(f"bad message: {e}"))

    def _state(self, tenant: str | None) -> bytes:
        """How full the queues are now, heading every answer to a request: the API server admits its
        next requests of this tenant without asking while they are far from the bounds. Without a
        tenant (a message that could not be read), "unknown": the API server keeps what it knew."""
        if tenant is None:
            return p.encode_state(p.UNKNOWN, p.UNKNOWN)
        return p.encode_state(*self.core.queue_state(tenant))

    def _answer(self, kind: int, rid: int, payload: bytes) -> None:
        self._unanswered.discard(rid)
        self.send(kind, rid, payload)

    def _error(self, rid: int, e: BaseException, tenant: str | None = None) -> None:
        self._answer(p.ERROR, rid, self._state(tenant) + p.encode_error(e))

    def _hello(self, rid: int, hello: dict[str, Any]) -> None:
        self.peer = str(hello["pid"])
        self.arena = Arena(hello["arena"], int(hello["arena_bytes"]), create=False)
        max_queued = self.core.scheduler.config.max_queue_images
        self.send(
            p.WELCOME, rid, p.encode_json({"info": self.core.info.to_json(), "max_queue_images": max_queued})
        )

    def _reserve(self, rid: int, tenant: str, n: int, bound: int | None) -> None:
        try:
            if not self.core.ready:
                raise Unavailable("the engine is not ready")
            self._held[rid] = self.core.hold(tenant, n, bound)
        except ServingError as e:  # Overloaded: the queue bounds refuse it
            self._error(rid, e, tenant)
        else:
            self.send(p.OK, rid, self._state(tenant))

    def _start(self, rid: int, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks[rid] = task
        self._unanswered.add(rid)
        task.add_done_callback(lambda t: self._done(rid, t))

    def _done(self, rid: int, task: asyncio.Task[None]) -> None:
        """Every RUN and CALL is answered, once: one cancelled before its coroutine ever ran (a CANCEL
        in the same read as its RUN) or that failed outside its own handlers is answered here."""
        self._tasks.pop(rid, None)
        if rid not in self._unanswered:
            return
        held = self._held.pop(rid, None)
        if held is not None:
            held.release()
        if task.cancelled():
            self._error(rid, Unavailable("cancelled"))
        else:
            log.error("request %d of API server %s failed", rid, self.peer, exc_info=task.exception())
            self._error(rid, InternalError("engine core: the request failed"))

    async def _run(self, rid: int, run: p.Run) -> None:
        admission = self._held.pop(rid, None)
        try:
            if self.arena is None:
                raise InvalidRequest("a RUN before HELLO")
            if admission is None:
                if run.reserved:
                    raise InvalidRequest("a RUN without its RESERVE")
                # Admitted by the API server from the queue state it saw: the bounds are checked now.
                admission = self.core.hold(run.tenant, run.images * len(run.outputs), run.tenant_max_queued)
            results = await self.core.run(
                admission,
                run.task_id,
                self._pixels(run, self.arena),
                run.outputs,
                top_k=run.top_k,
                timeout_s=run.timeout_s,
                weight=run.weight,
            )
            payload = self._state(run.tenant) + p.encode_results(results)
        except asyncio.CancelledError:
            self._error(rid, Unavailable("cancelled"), run.tenant)
            raise
        except Exception as e:
            if not isinstance(e, ServingError):
                log.exception("request %d of API server %s failed", rid, self.peer)
            self._error(rid, e, run.tenant)
        else:
            self._answer(p.RESULT, rid, payload)
        finally:
            if admission is not None:
                admission.release()

    @staticmethod
    def _pixels(run: p.Run, arena: Arena) -> Pixels:
        """The request's decoded images in place; the JPEGs' bytes copied out (the core decodes them
        before the request queues, and the block is the API server's again once it is answered)."""
        at = run.offset + run.pixel_bytes
        jpegs = []
        for position, length in run.jpegs:
            jpegs.append((position, arena.view(at, (length,)).numpy().tobytes()))
            at += length
        return Pixels(arena.view(run.offset, (run.n, 3, run.height, run.width)), tuple(jpegs))

    async def _call(self, rid: int, call: dict[str, Any]) -> None:
        op = call.pop("op")
        try:
            if op == "task_changed":
                answer: Any = await self.core.task_changed(
                    call["tenant"], call["task_id"], int(call["version"])
                )
            elif op == "task_deleted":
                answer = await self.core.task_deleted(call["tenant"], call["task_id"])
            elif op == "task_state":
                states = await self.core.task_state(call["tenant"], list(call["task_ids"]))
                answer = [{"resident_versions": s.resident_versions, "usage": vars(s.usage)} for s in states]
            elif op == "live":
                live = await self.core.live()
                answer = {
                    "bank": vars(live.bank),
                    "queued_images": live.queued_images,
                    "in_flight": live.in_flight,
                }
            else:
                raise InvalidRequest(f"unknown call {op!r}")
            payload = p.encode_json(answer)
        except Exception as e:
            self._error(rid, e)
        else:
            self._answer(p.ANSWER, rid, payload)

    def _on_lost(self, exc: Exception | None) -> None:
        """The API server is gone (exited, killed, or dropped): its requests leave the queues, and its
        arena is unmapped as soon as the requests computing now let go of their images."""
        self.server.connections.discard(self)
        for task in list(self._tasks.values()):
            task.cancel()
        for held in self._held.values():
            held.release()
        self._held.clear()
        self.arena = None
        log.debug("API server %s disconnected (%s)", self.peer, exc or "closed")
