"""Task residency: which version of a task is current, and getting it into the bank before dispatch.

A request is dispatched only once its task's current version sits in a bank slot. Resolving the
version and loading a cold task (store → host → validate → device) run off the event loop — store I/O in
a loader pool, the copy into the bank on the engine's own thread between batches — so a cold task never
stalls batches of other tasks: its requests simply wait in the queue while others are dispatched.

Replicas sharing one store notice new versions by re-reading the task's current version at most every
`version_ttl_s` seconds (a cheap `current_version` call); uploads and rollbacks through this server
update it at once.

State is kept only for tasks the store has shown to exist. A task id is the caller's choice: state kept
for every id requested (even only a failed lookup) would let any caller grow this server's memory
without bound, one id at a time. A lookup that finds no task (or cannot be done) fails the requests
waiting for it and leaves nothing behind. There is no negative cache: the next request for a missing id
costs one more `current_version` call, as it did before (requests waiting at once share one): ~20 µs
on a local store, against ~1 ms of server CPU for the request itself, and the tenant's rate limit
bounds them. A negative cache would also hide, for its TTL, a task just created through another
replica.

What this server itself changed wins over any store answer that may be older. An upload or rollback
(`set_current`) or a delete (`forget`) can land while a lookup or a load begun before it is in flight;
that answer may predate the change (a NotFound from before the upload, the version before the
rollback, a failure to load the version just replaced), so it is dropped, and the waiting requests go
on with the state as it is now: looked up or loaded again as needed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

from prompt_store.artifact import ArtifactError, load_artifact, validate_for_backbone
from prompt_store.base import CorruptArtifact as StoreCorrupt
from prompt_store.base import NotFound, PromptStore
from prompt_store.base import StoreUnavailable as StoreDown
from server.engine.bank import BankFull, SlotInfo, TaskKey, TaskTooLarge
from server.engine.engine import Engine
from server.errors import (
    CorruptArtifact,
    InvalidArtifact,
    Overloaded,
    ServingError,
    StoreUnavailable,
    TaskNotFound,
)

log = logging.getLogger(__name__)

Task = tuple[str, str]
BANK_FULL_WAIT_S = 10.0  # how long a load waits for a free slot before its requests get 429


@dataclass
class _TaskState:
    version: int | None = None  # current version as last seen in the store; None: first check in flight
    checked: float = 0.0  # monotonic time of that check
    refreshing: bool = False  # a version check is in flight
    loading: set[int] = field(default_factory=set)  # versions being loaded into the bank
    # Bumped by `set_current`: a lookup begun under an older generation may answer from before it.
    generation: int = 0


@dataclass
class Ready:
    slot: int
    info: SlotInfo


@dataclass
class Waiting:
    pass


class Residency:
    def __init__(
        self,
        engine: Engine,
        store: PromptStore,
        *,
        loader: Executor,
        on_change: Callable[[], None],
        on_failed: Callable[[Task, ServingError], None],
        version_ttl_s: float = 2.0,
        observe_load: Callable[[float], None] | None = None,
    ) -> None:
        self.engine, self.store = engine, store
        self._loader = loader
        self._on_change = on_change
        self._on_failed = on_failed  # fails the requests queued for a task
        self._ttl = version_ttl_s
        self._observe_load = observe_load or (lambda s: None)
        self._tasks: dict[Task, _TaskState] = {}
        self._bg: set[asyncio.Task[None]] = set()

    def resolve(self, task: Task) -> Ready | Waiting:
        """Non-blocking: where the task stands now; starts whatever work is missing. A failure is
        reported later, through `on_failed`, to every request then queued for the task."""
        st = self._tasks.setdefault(task, _TaskState())
        now = time.monotonic()
        if st.version is None or now - st.checked > self._ttl:
            if not st.refreshing:
                st.refreshing = True
                self._spawn(self._refresh(task, st))
            if st.version is None:
                return Waiting()
        key = TaskKey(task[0], task[1], st.version)
        slot = self.engine.bank.lookup(key)
        if slot is not None:
            return Ready(slot, self.engine.bank.info(slot))
        if st.version not in st.loading:
            st.loading.add(st.version)
            self._spawn(self._load(key, st))
        return Waiting()

    def set_current(self, tenant: str, task_id: str, version: int) -> None:
        """This server changed the current version (upload, rollback): use it from now on."""
        st = self._tasks.setdefault((tenant, task_id), _TaskState())
        st.version, st.checked = version, time.monotonic()
        st.generation += 1
        self._on_change()

    def knows(self, tenant: str, task_id: str) -> bool:
        """Whether the store has shown this task to exist (its current version is known here)."""
        st = self._tasks.get((tenant, task_id))
        return st is not None and st.version is not None

    def __len__(self) -> int:
        """Tasks with state here: those known to exist, and those whose first lookup is in flight."""
        return len(self._tasks)

    def forget(self, tenant: str, task_id: str) -> None:
        """Task deleted: drop its bank slots and cached version. Work in flight for the dropped state
        finds it gone from the table and changes nothing (`_refresh`, `_fail`)."""
        self._tasks.pop((tenant, task_id), None)
        self.engine.bank.drop_task(tenant, task_id)

    async def close(self) -> None:
        for t in list(self._bg):
            t.cancel()
        await asyncio.gather(*self._bg, return_exceptions=True)

    # --- background work --------------------------------------------------------------------------

    def _spawn(self, coro) -> None:  # type: ignore[no-untyped-def]
        t = asyncio.get_running_loop().create_task(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)

    async def _refresh(self, task: Task, st: _TaskState) -> None:
        loop = asyncio.get_running_loop()
        generation = st.generation
        try:
            found = await loop.run_in_executor(self._loader, self._lookup, task)
            if self._tasks.get(task) is not st or st.generation != generation:
                # This server changed the task (`set_current`, `forget`) while the lookup was in
                # flight, so the answer may predate the change: drop it. The requests go on with the
                # state as it is now (woken below).
                return
            if isinstance(found, int):
                st.version, st.checked = found, time.monotonic()
            elif isinstance(found, NotFound):
                self.engine.bank.drop_task(*task)
                st.version = None  # gone (or never was): forget it
                self._fail(task, st, TaskNotFound(f"task {task[1]!r} not found"))
            elif isinstance(found, StoreDown):
                if st.version is None:  # nothing to serve from; a known version keeps serving
                    self._fail(task, st, StoreUnavailable(f"prompt store unavailable: {found}"))
                else:
                    st.checked = time.monotonic()  # retry after another TTL, keep serving what we have
            else:
                log.error("version check failed for %s/%s", *task, exc_info=found)
                self._fail(task, st, StoreUnavailable(f"prompt store error: {found}"))
        finally:
            st.refreshing = False
            self._on_change()

    def _lookup(self, task: Task) -> int | Exception:
        """Loader thread: the task's current version in the store, or why there is none (judged on the
        event loop, which alone knows whether the answer is still wanted)."""
        try:
            return self.store.current_version(*task)
        except Exception as e:
            return e

    async def _load(self, key: TaskKey, st: _TaskState) -> None:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        try:
            artifact = await loop.run_in_executor(self._loader, self._fetch, key)
            give_up = time.monotonic() + BANK_FULL_WAIT_S
            while True:
                try:
                    await asyncio.wrap_future(self.engine.submit_install(key, artifact))
                    break
                except BankFull as e:
                    # Every slot is busy with in-flight work: try again once some of it completes.
                    if time.monotonic() > give_up:
                        raise Overloaded(f"cannot load task {key.task_id!r}: {e}", retry_after=5) from None
                    await asyncio.sleep(0.005)
            self._observe_load(time.perf_counter() - t0)
        except ServingError as e:
            self._load_failed(key, st, e)
        except Exception as e:
            log.exception("loading %s failed", key)
            error = InvalidArtifact(f"task {key.task_id!r} version {key.version} cannot be loaded: {e}")
            self._load_failed(key, st, error)
        finally:
            st.loading.discard(key.version)
            self._on_change()

    def _load_failed(self, key: TaskKey, st: _TaskState, error: ServingError) -> None:
        """A version that is no longer current (an upload or rollback, or a lookup, replaced it while
        it loaded) fails nothing: the queued requests are the current version's, loaded for them on
        the next resolve."""
        if st.version == key.version:
            self._fail(key.task, st, error)

    def _fail(self, task: Task, st: _TaskState, error: ServingError) -> None:
        """Fail the requests queued for the task; a task with no known version keeps no state.

        A state no longer in the table (the task was deleted, or re-created since) fails nothing: its
        requests are those of the newer state."""
        if self._tasks.get(task) is not st:
            return
        if st.version is None:
            del self._tasks[task]
        self._on_failed(task, error)

    def _fetch(self, key: TaskKey):  # type: ignore[no-untyped-def]
        """Loader thread: read, verify and validate one version (store → host)."""
        try:
            data, _ = self.store.get(key.tenant, key.task_id, key.version)
        except NotFound:
            raise TaskNotFound(f"task {key.task_id!r} version {key.version} not found") from None
        except StoreDown as e:
            raise StoreUnavailable(f"prompt store unavailable: {e}") from None
        except StoreCorrupt as e:
            raise CorruptArtifact(
                f"task {key.task_id!r} version {key.version} is corrupt in the store: {e}"
            ) from None
        try:
            artifact = load_artifact(data)
            validate_for_backbone(artifact, self.engine.signature)
            self.engine.bank.check_fits(artifact)
        except ArtifactError as e:
            raise CorruptArtifact(
                f"stored task {key.task_id!r} version {key.version} is invalid: {e}"
            ) from None
        except TaskTooLarge as e:
            raise InvalidArtifact(str(e)) from None
        return artifact
