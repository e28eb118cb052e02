"""The prompt store interface: versioned, tenant-namespaced storage of task artifacts.

DESIGN.md ("Storage and consistency"). A store keeps, per (tenant, task), a list of immutable versions
(1, 2, 3, … — strictly increasing, never reused, even after the task is deleted and re-created) and a
*current* pointer. Every mutation is one atomic switch of a small per-task manifest, so a reader sees
either the old or the new state, never a torn one. Artifacts are validated with `load_artifact` before
anything is written: a file that fails validation is never stored.

The backends (`local.LocalStore`, `s3.S3Store`) implement only the storage primitives and their own
write protocol; the read path (get / info / listing) lives here so both behave identically. The
contract test suite (tests/prompt_store/test_store_contract.py) runs unchanged against both.

This module knows nothing of GPUs or HTTP; the serving layer maps the typed errors below to statuses.
"""

from __future__ import annotations

import hashlib
import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prompt_store.artifact import ArtifactLimits, ArtifactMetadata, load_artifact, read_metadata
from prompt_store.errors import ArtifactError
from prompt_store.ids import check_id

if TYPE_CHECKING:
    from prompt_store.manifest import Manifest  # manifest.py builds on the records defined here

__all__ = [
    "DEFAULT_KEEP_VERSIONS",
    "Conflict",
    "CorruptArtifact",
    "InvalidArtifact",
    "InvalidId",
    "NotFound",
    "PromptStore",
    "StoreError",
    "StoreUnavailable",
    "TaskInfo",
    "TaskLimitReached",
    "TaskPage",
    "Validator",
    "VersionInfo",
    "verify_integrity",
]

DEFAULT_KEEP_VERSIONS = 5
# get() re-reads the manifest when a listed version vanished underneath it (pruned or deleted between
# the two reads); more misses than this in a row means the manifest points at data that is gone.
_READ_ATTEMPTS = 5

Validator = Callable[[bytes], object]
"""Extra upload check (e.g. "trained on the running backbone"): raise to refuse; the return is ignored."""


# ---------------------------------------------------------------------------------------------- errors
class StoreError(Exception):
    """Base class of every prompt-store error."""


class InvalidId(StoreError, ValueError):
    """A tenant or task id (or a list cursor) breaks the id rule (see `prompt_store.ids`)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field  # "tenant", "task_id" or "cursor"
        super().__init__(message)


class NotFound(StoreError, LookupError):
    """The task does not exist (never stored, or deleted), or it has no such version (any more)."""

    def __init__(self, tenant: str, task_id: str, version: int | None = None) -> None:
        self.tenant = tenant
        self.task_id = task_id
        self.version = version  # None: the task itself is missing
        what = (
            f"task {tenant}/{task_id}" if version is None else f"version {version} of task {tenant}/{task_id}"
        )
        super().__init__(f"{what} not found")


class InvalidArtifact(StoreError, ValueError):
    """The uploaded bytes failed artifact validation (format, limits, or the caller's validator).

    Wraps `prompt_store.errors.ArtifactError` and keeps its `field`, so the HTTP layer can name the
    offending tensor / metadata key without parsing the message.
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")

    def __reduce__(self) -> tuple[type[InvalidArtifact], tuple[str, str]]:
        # Keep it picklable across process pools (the default would pass only str(self)).
        return (type(self), (self.field, self.message))


class CorruptArtifact(StoreError):
    """Stored data failed an integrity check: bytes whose sha256/size differ from the manifest, a
    manifest that does not parse, or a listed version whose data is missing. Never a client error."""


class StoreUnavailable(StoreError):
    """The backing store cannot be reached or refused us (network, timeout, credentials, missing
    bucket, I/O error). Retryable from the caller's point of view; maps to 503."""


class Conflict(StoreError):
    """Could not get exclusive access to a task in time (lock timeout, or too many lost races)."""


class TaskLimitReached(StoreError):
    """`put(..., max_tasks=N)` would create a task while the tenant already has N live tasks."""

    def __init__(self, tenant: str, max_tasks: int) -> None:
        self.tenant = tenant
        self.max_tasks = max_tasks
        super().__init__(f"tenant {tenant!r} already has its maximum of {max_tasks} tasks")

    def __reduce__(self) -> tuple[type[TaskLimitReached], tuple[str, int]]:
        return (type(self), (self.tenant, self.max_tasks))


# --------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class VersionInfo:
    """One committed, immutable version of a task artifact."""

    version: int  # 1-based; strictly increasing per task and never reused, even across delete
    sha256: str  # lowercase hex digest of the artifact bytes; verified on every read
    size: int  # artifact size in bytes
    created: float  # Unix time at which this version was committed


@dataclass(frozen=True)
class TaskInfo:
    """A task as the manifest describes it: readable without touching any tensor data."""

    tenant: str
    task_id: str
    current: VersionInfo  # the version get() serves by default (latest upload, or a rollback target)
    versions: tuple[VersionInfo, ...]  # retained versions, oldest first; includes `current`
    metadata: ArtifactMetadata  # header of the current version: mode, labels, prompt shape, backbone…

    @property
    def current_version(self) -> int:
        """Shorthand for ``current.version``."""
        return self.current.version


@dataclass(frozen=True)
class TaskPage:
    """One page of a tenant's tasks, in `ids.listing_key` order."""

    items: tuple[TaskInfo, ...]  # at most `limit` live tasks
    next_cursor: str | None  # pass to list_tasks() for the next page; None when there is no more


# ------------------------------------------------------------------------------------------ interface
class PromptStore(ABC):
    """Durable, versioned, tenant-namespaced storage of task artifacts.

    Thread-safe: one instance may be shared by the threads of a process. Several processes (or hosts,
    for S3) may open the same store concurrently; writers to one task are serialised and readers never
    see partial data. Do not share one instance across fork(); open a store per process.
    """

    # Seconds a put waits for a lock (a task's locally; the tenant's creation lock on both backends)
    # before it raises Conflict. Each backend sets it from its `lock_timeout` option.
    lock_timeout: float = 30.0

    def __init__(
        self, *, keep_versions: int = DEFAULT_KEEP_VERSIONS, limits: ArtifactLimits | None = None
    ) -> None:
        """Args:
        keep_versions: how many of the newest versions to retain per task (>= 1). Pruning happens
            when a put commits, and the new version is then current, so the current version is never
            pruned; set_current() may target any retained version.
        limits: artifact limits passed to `load_artifact` on upload (None: the format's defaults).
        """
        if not isinstance(keep_versions, int) or keep_versions < 1:
            raise ValueError(f"keep_versions must be an integer >= 1, got {keep_versions!r}")
        self.keep_versions = keep_versions
        self.limits = limits

    # ----------------------------------------------------------------------------------- public API
    @property
    @abstractmethod
    def url(self) -> str:
        """Where the store lives, as `open_store` would accept it (no credentials)."""

    def put(
        self,
        tenant: str,
        task_id: str,
        data: bytes,
        validator: Validator | None = None,
        *,
        max_tasks: int | None = None,
        live_only: bool = False,
    ) -> VersionInfo:
        """Store `data` as a new version of the task and make it current.

        The artifact is fully validated (`load_artifact` with this store's limits, then `validator`
        if given) before anything is written; on failure nothing is stored. Returns when the version
        is durable and visible to every reader.

        Args:
            max_tasks: the tenant's task limit, or None for none. A task that is not live (never
                stored, or deleted) is created only if the tenant has fewer than `max_tasks` live
                tasks; the count and the create are one step, under a per-tenant creation lock that
                every store instance on the same store honours (processes, and replicas: see
                docs/store.md for how far that holds per backend). A new version of a live task is
                never refused and takes no tenant-wide lock.
            live_only: only add a version to a live task, atomically with the commit: NotFound if
                the task is not live. Never creates, so it never counts or takes the tenant's
                creation lock (a caller can tell creates, which may wait for that lock, from new
                versions, which do not); `max_tasks` is not needed then.

        Raises:
            InvalidId, InvalidArtifact, TaskLimitReached, StoreUnavailable, Conflict, NotFound (live_only).
        """
        tenant, task_id = self._check(tenant, task_id)
        if max_tasks is not None and (
            not isinstance(max_tasks, int) or isinstance(max_tasks, bool) or max_tasks < 0
        ):
            raise ValueError(f"max_tasks must be None or an integer >= 0, got {max_tasks!r}")
        data = bytes(data)  # accept bytearray / memoryview, and never keep a buffer the caller mutates
        self.validate(data, validator)
        sha256 = hashlib.sha256(data).hexdigest()
        if live_only:
            info = self._put(tenant, task_id, data, sha256, live_only=True)
            if info is None:
                raise NotFound(tenant, task_id)
        elif max_tasks is None:
            info = self._put(tenant, task_id, data, sha256)
        else:
            info = self._put(tenant, task_id, data, sha256, live_only=True)
            if info is None:
                info = self._create_within_limit(tenant, task_id, data, sha256, max_tasks)
        assert info is not None, "_put returns None only with live_only"
        return info

    def _create_within_limit(
        self, tenant: str, task_id: str, data: bytes, sha256: str, max_tasks: int
    ) -> VersionInfo | None:
        # Under the lock no other limited writer can create a task of this tenant, so the count cannot
        # go stale before our commit. Deletes may run meanwhile: they only lower the count.
        with self._creation_lock(tenant) as check:
            current = self._load_manifest(tenant, task_id)
            live = current is not None and not current.deleted  # created meanwhile: a new version
            if not live and self._count_live(tenant, max_tasks, check) >= max_tasks:
                raise TaskLimitReached(tenant, max_tasks)
            return self._put(tenant, task_id, data, sha256, check=check)

    def validate(self, data: bytes, validator: Validator | None = None) -> ArtifactMetadata:
        """Run the upload checks without storing anything; returns the artifact's header metadata.

        Raises:
            InvalidArtifact: naming the offending field.
        """
        try:
            load_artifact(data, self.limits)
            if validator is not None:
                validator(data)
            return read_metadata(data, self.limits)
        except ArtifactError as e:
            raise InvalidArtifact(e.field, e.message) from e

    def get(self, tenant: str, task_id: str, version: int | None = None) -> tuple[bytes, VersionInfo]:
        """The bytes of the current version (or of `version`), checked against their sha256.

        Raises:
            InvalidId, NotFound (task, or that version), CorruptArtifact, StoreUnavailable.
        """
        tenant, task_id = self._check(tenant, task_id)
        if version is not None and (not isinstance(version, int) or isinstance(version, bool) or version < 1):
            raise NotFound(tenant, task_id, version)
        for _ in range(_READ_ATTEMPTS):
            manifest = self._live_manifest(tenant, task_id)
            record = manifest.record(manifest.current if version is None else version)
            if record is None:
                raise NotFound(tenant, task_id, version)
            data = self._read_version(tenant, task_id, record.version)
            if data is None:
                # Pruned, rolled past or deleted between our two reads: the manifest has moved on.
                continue
            verify_integrity(data, record, tenant, task_id)
            return data, record
        raise CorruptArtifact(f"task {tenant}/{task_id}: the manifest lists a version whose data is missing")

    def info(self, tenant: str, task_id: str) -> TaskInfo:
        """Versions and current-version metadata, from the manifest alone (no tensor data is read).

        Raises:
            InvalidId, NotFound, CorruptArtifact, StoreUnavailable.
        """
        tenant, task_id = self._check(tenant, task_id)
        return self._live_manifest(tenant, task_id).task_info()

    def current_version(self, tenant: str, task_id: str) -> int:
        """The current version number: one small read, meant to be polled by caching replicas.

        Raises:
            InvalidId, NotFound, CorruptArtifact, StoreUnavailable.
        """
        tenant, task_id = self._check(tenant, task_id)
        current = self._load_manifest(tenant, task_id)
        if current is None or current.deleted:
            raise NotFound(tenant, task_id)
        return current.current

    def list_tasks(self, tenant: str, limit: int = 100, cursor: str | None = None) -> TaskPage:
        """One page of the tenant's live tasks, in `ids.listing_key` order, starting after `cursor`.

        Reads one manifest per returned task. A page may hold fewer than `limit` items (deleted tasks
        are skipped) — keep going until `next_cursor` is None.

        Raises:
            InvalidId (tenant or cursor), StoreUnavailable.
        """
        tenant = check_id(tenant, "tenant")
        if cursor is not None:
            check_id(cursor, "cursor")
        if not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise ValueError(f"limit must be an integer in [1, 1000], got {limit!r}")
        items: list[TaskInfo] = []
        last = cursor
        candidates = self._task_ids(tenant, cursor)
        for batch in _batched(candidates, limit):
            for task_id, manifest in zip(batch, self._load_manifests(tenant, batch), strict=True):
                last = task_id
                if manifest is not None and not manifest.deleted:
                    items.append(manifest.task_info())
                    if len(items) == limit:
                        break
            if len(items) == limit:
                break
        else:
            return TaskPage(items=tuple(items), next_cursor=None)
        # Stopped on a full page: a next page exists iff some candidate id is left after `last`.
        more = next(iter(self._task_ids(tenant, last)), None) is not None
        return TaskPage(items=tuple(items), next_cursor=last if more else None)

    def count_tasks(self, tenant: str, stop_at: int | None = None) -> int:
        """The tenant's live tasks, counted through the listing (one manifest read per task id, deleted
        tasks' included); with `stop_at`, stops once that many are found and returns a number
        >= `stop_at` (not exact beyond it).

        Raises:
            InvalidId, StoreUnavailable.
        """
        return self._count_live(check_id(tenant, "tenant"), stop_at, lambda: None)

    def _count_live(self, tenant: str, stop_at: int | None, check: Callable[[], None]) -> int:
        # Under an S3 creation lease every read spends the holder's time, so: read no more manifests
        # than the count still needs, and call check() between batches of at most _COUNT_BATCH_MAX
        # (it raises once the lease may have run out: a count that takes too long stops there, within
        # a few round trips). Batches not below _COUNT_BATCH_MIN, though: a deleted task is known only
        # by its manifest, and smaller batches would read a run of tombstones one at a time.
        n = 0
        ids = iter(self._task_ids(tenant, None))
        while stop_at is None or n < stop_at:
            size = 1000 if stop_at is None else min(_COUNT_BATCH_MAX, max(stop_at - n, _COUNT_BATCH_MIN))
            batch = list(itertools.islice(ids, size))
            if not batch:
                break
            check()
            n += sum(1 for m in self._load_manifests(tenant, batch) if m is not None and not m.deleted)
        return n

    def tenants(self) -> list[str]:
        """Tenants that have at least one live task, sorted (an admin operation: scans the store)."""
        out = []
        for tenant in self._tenant_ids():
            if self.list_tasks(tenant, limit=1).items:
                out.append(tenant)
        return sorted(out)

    def delete(self, tenant: str, task_id: str) -> None:
        """Delete the task and all its versions.

        The manifest becomes a tombstone first (atomic: from then on every reader gets NotFound),
        then the version data is removed. The tombstone remembers the last version number, so a
        re-created task continues at last + 1 and a cached "v3" can never be confused with a new "v3".

        Raises:
            InvalidId, NotFound, StoreUnavailable, Conflict.
        """
        tenant, task_id = self._check(tenant, task_id)
        self._delete(tenant, task_id)

    def set_current(self, tenant: str, task_id: str, version: int) -> VersionInfo:
        """Make a retained `version` current (rollback, or roll forward again). Returns its info.

        Raises:
            InvalidId, NotFound (task, or version not retained), StoreUnavailable, Conflict.
        """
        tenant, task_id = self._check(tenant, task_id)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise NotFound(tenant, task_id, version)
        return self._set_current(tenant, task_id, version)

    def sweep(self, tenant: str | None = None) -> int:
        """Remove stored data that no manifest references; returns how many files/objects went.

        Garbage only arises from crashes (a writer killed between writing a version and committing
        it, or between committing and pruning, or in the middle of a delete); writers also clean the
        task they touch. Safe to run while other processes read and write.

        Raises:
            InvalidId, StoreUnavailable.
        """
        tenants = [check_id(tenant, "tenant")] if tenant is not None else list(self._tenant_ids())
        return sum(self._sweep_task(t, task_id) for t in tenants for task_id in list(self._task_ids(t, None)))

    @abstractmethod
    def ping(self) -> None:
        """Check that the store is reachable and usable (readiness probes). Raises StoreUnavailable."""

    def close(self) -> None:  # noqa: B027 - optional hook, not abstract: LocalStore holds nothing open
        """Release network resources. The store must not be used afterwards."""

    def __enter__(self) -> PromptStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------- backend primitives
    @abstractmethod
    def _put(
        self,
        tenant: str,
        task_id: str,
        data: bytes,
        sha256: str,
        *,
        live_only: bool = False,
        check: Callable[[], None] | None = None,
    ) -> VersionInfo | None:
        """Write validated `data` as version last + 1, commit it as current, prune; ids are checked.

        live_only: commit only on top of a live manifest (atomically with the commit); if the task is
            missing or deleted, leave nothing behind and return None.
        check: called right before the commit; raises (StoreUnavailable) when the caller's creation
            lock may have passed to another writer, and then nothing is committed.
        """

    @abstractmethod
    def _creation_lock(self, tenant: str) -> AbstractContextManager[Callable[[], None]]:
        """The tenant's exclusive creation lock, shared by every instance on this store (Conflict if
        it cannot be had in time). Yields the `check` to call while counting and to pass to `_put`."""

    @abstractmethod
    def _delete(self, tenant: str, task_id: str) -> None:
        """Tombstone the manifest, then remove the version data. Raise NotFound if not live."""

    @abstractmethod
    def _set_current(self, tenant: str, task_id: str, version: int) -> VersionInfo:
        """Point the manifest at a retained version."""

    @abstractmethod
    def _sweep_task(self, tenant: str, task_id: str) -> int:
        """Remove one task's unreferenced data without racing its writers; returns the count."""

    @abstractmethod
    def _load_manifest(self, tenant: str, task_id: str) -> Manifest | None:
        """The task's manifest (maybe a tombstone), or None if the task was never committed."""

    @abstractmethod
    def _read_version(self, tenant: str, task_id: str, version: int) -> bytes | None:
        """The stored bytes of one version, or None if they are not there (pruned / deleted)."""

    @abstractmethod
    def _task_ids(self, tenant: str, after: str | None) -> Iterable[str]:
        """Candidate task ids of a tenant in listing-key order, strictly after `after`.

        May include tasks that are deleted or were never committed; callers check the manifest.
        """

    @abstractmethod
    def _tenant_ids(self) -> Iterable[str]:
        """Candidate tenant ids (any tenant that has ever stored something)."""

    def _load_manifests(self, tenant: str, task_ids: list[str]) -> list[Manifest | None]:
        """Manifests of several tasks; backends with network latency override this to fetch in parallel."""
        return [self._load_manifest(tenant, t) for t in task_ids]

    # ---------------------------------------------------------------------------------- helpers
    @staticmethod
    def _check(tenant: str, task_id: str) -> tuple[str, str]:
        return check_id(tenant, "tenant"), check_id(task_id, "task_id")

    def _live_manifest(self, tenant: str, task_id: str) -> Manifest:
        manifest = self._load_manifest(tenant, task_id)
        if manifest is None or manifest.deleted:
            raise NotFound(tenant, task_id)
        return manifest


def verify_integrity(data: bytes, info: VersionInfo, tenant: str, task_id: str) -> None:
    """Raise CorruptArtifact unless `data` has the size and sha256 recorded in `info`."""
    if len(data) != info.size or hashlib.sha256(data).hexdigest() != info.sha256:
        raise CorruptArtifact(
            f"version {info.version} of task {tenant}/{task_id} does not match its recorded sha256/size "
            f"({len(data)} bytes read, {info.size} recorded)"
        )


_COUNT_BATCH_MIN = 8  # the S3 store's parallel manifest reads (s3.py `_load_manifests`)
_COUNT_BATCH_MAX = 32  # manifest reads between two lease checks while counting (4 parallel rounds on S3)


def _batched(items: Iterable[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch
