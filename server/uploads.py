"""Task uploads: the store puts behind `PUT /v1/tasks/{id}`, with the tenant's task limit.

Store calls block, so they run in threads of the event loop's default pool, which every task route
shares (min(32, CPUs + 4) threads: 6 on 2 cores). A put that creates a task under a limit waits in the
store for the tenant's creation lock (docs/store.md "Task limits") for up to the store's
`lock_timeout` (30 s), and the lock can stay taken that long: another replica counting a large tenant,
a crashed S3 holder whose lease has not expired yet. A thread per waiting create would let one
tenant's few concurrent creates take the whole pool and stall every tenant's task routes. So creates
of one tenant queue here, on the event loop (`KeyedGate`), and at most one thread per tenant waits for
the store's lock. New versions of live tasks take no tenant lock in the store and do not queue.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from prompt_store.base import NotFound, PromptStore, TaskInfo, Validator
from server.errors import Unavailable

T = TypeVar("T")


class GateTimeout(Exception):
    """`KeyedGate.run` waited `timeout` seconds for the key's previous call to end."""


@dataclass
class _Slot:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0  # calls holding or waiting for `lock`; the slot is dropped at 0


class KeyedGate:
    """Runs blocking calls in the default thread pool, one at a time per key; the others wait on the
    event loop, holding no thread. A key has state only while a call of it runs or waits, so keys that
    callers choose cannot make it grow."""

    def __init__(self) -> None:
        self._slots: dict[str, _Slot] = {}

    def __len__(self) -> int:
        """Keys with a call running or waiting."""
        return len(self._slots)

    def users(self, key: str) -> int:
        """Calls of `key` running or waiting."""
        slot = self._slots.get(key)
        return slot.users if slot is not None else 0

    async def run(self, key: str, fn: Callable[[], T], *, timeout: float) -> T:
        """`fn()` in a thread once no other call of `key` runs; GateTimeout after waiting `timeout`.

        A started thread cannot be stopped, so the key stays taken until it ends, even when the caller
        is cancelled meanwhile (a client that went away): a second thread never joins it.
        """
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot()
        slot.users += 1
        try:
            await _acquire(slot.lock, timeout, f"waited {timeout:g}s for the previous call of {key!r}")
            try:
                loop = asyncio.get_running_loop()
                future = loop.run_in_executor(None, contextvars.copy_context().run, fn)  # as to_thread
            except BaseException:
                slot.lock.release()
                raise
        except BaseException:
            self._leave(key, slot)
            raise
        future.add_done_callback(functools.partial(self._done, key, slot))
        return await asyncio.shield(future)

    def _done(self, key: str, slot: _Slot, future: asyncio.Future[object]) -> None:
        slot.lock.release()
        self._leave(key, slot)
        if not future.cancelled():
            future.exception()  # retrieved here too: its caller may have been cancelled

    def _leave(self, key: str, slot: _Slot) -> None:
        slot.users -= 1
        if slot.users == 0:
            del self._slots[key]


async def _acquire(lock: asyncio.Lock, timeout: float, message: str) -> None:
    """`lock` within `timeout` seconds, else GateTimeout; never left held by a timeout or a
    cancellation. (`asyncio.timeout` would do, but the project supports Python 3.10.) A cancelled
    acquire either never got the lock (`cancel()` is True: `Lock.acquire` passes it on) or had already
    finished with it (`cancel()` is False), which is then kept or given back."""
    acquiring = asyncio.ensure_future(lock.acquire())
    try:
        done, _ = await asyncio.wait({acquiring}, timeout=timeout)
    except BaseException:  # the caller was cancelled while waiting
        if not acquiring.cancel() and not acquiring.cancelled():
            lock.release()
        raise
    if not done and acquiring.cancel():
        raise GateTimeout(message)


class TaskUploads:
    """Stores uploaded artifacts: new versions at once, creates one at a time per tenant."""

    def __init__(self, store: PromptStore, validator: Validator) -> None:
        """Args:
        store: the prompt store; its `lock_timeout` also bounds the wait for a tenant's earlier create.
        validator: the upload check against the running backbone (`Services.validate_upload`).
        """
        self._store = store
        self._validator = validator
        self.creates = KeyedGate()  # by tenant: creates under a limit, one thread per tenant

    async def put(
        self, tenant: str, task_id: str, data: bytes, *, max_tasks: int | None
    ) -> tuple[bool, TaskInfo]:
        """Store `data` as a new version of the task, or as a new task within `max_tasks` (None: no
        limit); returns (whether the task existed, its info).

        Raises:
            The store's errors (TaskLimitReached when a create would pass `max_tasks`);
            Unavailable (503, retryable) after waiting `lock_timeout` behind an earlier create of
            the tenant.
        """
        if max_tasks is None:  # no limit: the store takes no tenant lock, nothing to queue for
            return await asyncio.to_thread(self._put, tenant, task_id, data, None)
        info = await asyncio.to_thread(self._add_version, tenant, task_id, data)
        if info is not None:
            return True, info
        timeout = self._store.lock_timeout
        try:
            return await self.creates.run(
                tenant, functools.partial(self._put, tenant, task_id, data, max_tasks), timeout=timeout
            )
        except GateTimeout:
            raise Unavailable(
                f"timed out after {timeout:g}s behind another upload that creates a task of tenant "
                f"{tenant!r} (it waits for the tenant's creation lock); nothing was stored"
            ) from None

    def _add_version(self, tenant: str, task_id: str, data: bytes) -> TaskInfo | None:
        """A new version of a live task, or None (nothing stored) if the task is not live."""
        try:
            # One small read first, so that a create (the common case here) is not validated twice.
            self._store.current_version(tenant, task_id)
            self._store.put(tenant, task_id, data, validator=self._validator, live_only=True)
        except NotFound:
            return None
        return self._store.info(tenant, task_id)

    def _put(self, tenant: str, task_id: str, data: bytes, max_tasks: int | None) -> tuple[bool, TaskInfo]:
        try:
            self._store.current_version(tenant, task_id)  # created meanwhile? then this is a new version
            existed = True
        except NotFound:
            existed = False
        self._store.put(tenant, task_id, data, validator=self._validator, max_tasks=max_tasks)
        return existed, self._store.info(tenant, task_id)
