"""Local-directory backend (the default): one directory, shared safely by several processes.

Layout under the root (docs/store.md)::

    tenants/<tenant>/tasks/<task_id>/manifest.json          the commit point (see manifest.py)
    tenants/<tenant>/tasks/<task_id>/v000001.safetensors    immutable version data
    tenants/<tenant>/tasks/<task_id>/.lock                  flock(2) target serialising writers
    tenants/<tenant>/tasks/<task_id>/.tmp-<hex>             in-flight writes (crash leftovers)
    tenants/<tenant>/.create-lock                           flock(2) target of `put(max_tasks=…)`

A put with a task limit that creates a task holds the tenant's `.create-lock` across counting the
tenant's tasks and committing, so every process (and host, over a file system whose flock reaches
them) that opens the directory sees the count and the create as one step. Lock order: the tenant's
lock before a task's, never the other way round.

Protocol (DESIGN.md, "Storage and consistency"): writers take the task's exclusive flock, write the
version to a temp file, fsync it, rename it into place and fsync the directory, then do the same for
the manifest — that last rename is the commit. Readers take no lock: rename(2) swaps the manifest
atomically and version files are immutable once named, so a reader sees the old or the new state.
The kernel drops a dead process's flock, so a SIGKILLed writer never wedges a task, and anything it
left behind is garbage that the next writer of that task removes while holding the lock.

The store never recreates its own directories after opening: if `<root>/tenants` vanishes (the
volume went away, someone removed it), every operation raises StoreUnavailable instead of reading the
store as empty or writing into a fresh tree; a task's missing manifest means NotFound only while that
directory exists.

POSIX only (fcntl.flock, directory fsync). Several hosts may share the directory only over a file
system with working flock and atomic rename (local disks, NFSv4); see docs/store.md.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from prompt_store.base import (
    DEFAULT_KEEP_VERSIONS,
    Conflict,
    CorruptArtifact,
    NotFound,
    PromptStore,
    StoreUnavailable,
    VersionInfo,
    verify_integrity,
)
from prompt_store.ids import ID_PATTERN, listing_key
from prompt_store.manifest import Manifest, header_text, parse_version_name, version_name

if TYPE_CHECKING:
    from prompt_store.artifact import ArtifactLimits

__all__ = ["LocalStore"]

MANIFEST = "manifest.json"
LOCK = ".lock"
CREATE_LOCK = ".create-lock"
TMP_PREFIX = ".tmp-"


class LocalStore(PromptStore):
    """Prompt store in a local (or shared POSIX) directory."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        keep_versions: int = DEFAULT_KEEP_VERSIONS,
        limits: ArtifactLimits | None = None,
        lock_timeout: float = 30.0,
        create: bool = True,
    ) -> None:
        """Args:
        root: the store directory.
        keep_versions: newest versions kept per task (the current one is always kept).
        limits: `ArtifactLimits` applied to uploads (None: the format's defaults).
        lock_timeout: seconds a writer waits for a task's lock before raising Conflict.
        create: create `root` if missing; False raises StoreUnavailable instead (e.g. an
            unmounted volume should not silently become an empty store).
        """
        super().__init__(keep_versions=keep_versions, limits=limits)
        self.root = Path(root).absolute()
        self.lock_timeout = float(lock_timeout)
        self._tenants_dir = self.root / "tenants"
        if create:
            with _io_errors(f"creating store directory {self.root}"):
                _make_dirs(self._tenants_dir)
        elif not self._tenants_dir.is_dir():
            raise StoreUnavailable(f"{self._tenants_dir} does not exist (create=False)")

    @property
    def url(self) -> str:
        return self.root.as_uri()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r}, keep_versions={self.keep_versions})"

    def ping(self) -> None:
        self._check_present()
        if not os.access(self._tenants_dir, os.W_OK | os.X_OK):
            raise StoreUnavailable(f"store directory {self._tenants_dir} is not writable")

    def _check_present(self) -> None:
        """StoreUnavailable unless the tenants directory made at open is still there.

        Called when something is missing, to tell "no such task" (the store is there) from "the store
        itself is gone" — which must not read as an empty store, nor be recreated by a write.
        """
        with _io_errors(f"checking store directory {self._tenants_dir}"):
            if not self._tenants_dir.is_dir():
                raise StoreUnavailable(f"store directory {self._tenants_dir} is missing")

    # ----------------------------------------------------------------------------------- writes
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
        task_dir = self._task_dir(tenant, task_id)
        with _io_errors(f"writing {tenant}/{task_id}"):
            if live_only and not task_dir.is_dir():
                return None
            _make_dirs(task_dir, base=self._tenants_dir)
            with self._locked(task_dir / LOCK):
                previous = self._read_manifest(task_dir, tenant, task_id)
                if live_only and (previous is None or previous.deleted):
                    return None  # under the task lock: nobody can revive it before we are out
                self._tidy(task_dir, previous)
                version = (previous.last_version if previous else 0) + 1
                _write_durably(task_dir, version_name(version), data)
                info = VersionInfo(version=version, sha256=sha256, size=len(data), created=time.time())
                manifest, dropped = Manifest.after_put(
                    previous, tenant, task_id, info, header_text(data), self.keep_versions
                )
                if check is not None:
                    check()
                _write_durably(task_dir, MANIFEST, manifest.to_bytes())  # the commit point
                # After the commit: a crash here leaves unreferenced files, which _tidy removes later.
                for old in dropped:
                    _unlink_quietly(task_dir / version_name(old))
        return info

    @contextmanager
    def _creation_lock(self, tenant: str) -> Iterator[Callable[[], None]]:
        # A flock stays ours until we close it (the kernel drops it only with our process), so the
        # check before the commit has nothing to verify.
        tenant_dir = self._tenants_dir / tenant
        with _io_errors(f"locking tenant {tenant}"):
            _make_dirs(tenant_dir, base=self._tenants_dir)
            with self._locked(tenant_dir / CREATE_LOCK):
                yield lambda: None

    def _existing_task_dir(self, tenant: str, task_id: str) -> Path:
        """The task's directory; NotFound if there is none (StoreUnavailable if the store is gone)."""
        task_dir = self._task_dir(tenant, task_id)
        if not task_dir.is_dir():
            self._check_present()
            raise NotFound(tenant, task_id)
        return task_dir

    def _delete(self, tenant: str, task_id: str) -> None:
        task_dir = self._existing_task_dir(tenant, task_id)
        with _io_errors(f"deleting {tenant}/{task_id}"), self._locked(task_dir / LOCK):
            manifest = self._read_manifest(task_dir, tenant, task_id)
            if manifest is None or manifest.deleted:
                raise NotFound(tenant, task_id)
            _write_durably(task_dir, MANIFEST, manifest.tombstone().to_bytes())  # the commit point
            self._tidy(task_dir, manifest.tombstone())

    def _set_current(self, tenant: str, task_id: str, version: int) -> VersionInfo:
        task_dir = self._existing_task_dir(tenant, task_id)
        with _io_errors(f"updating {tenant}/{task_id}"), self._locked(task_dir / LOCK):
            manifest = self._read_manifest(task_dir, tenant, task_id)
            if manifest is None or manifest.deleted:
                raise NotFound(tenant, task_id)
            info = manifest.record(version)
            if info is None:
                raise NotFound(tenant, task_id, version)
            try:
                data = _read_file(task_dir / version_name(version))
            except FileNotFoundError:
                # Under the lock nothing can prune the file, so a miss here is real damage.
                raise CorruptArtifact(
                    f"version {version} of {tenant}/{task_id} is listed but missing"
                ) from None
            verify_integrity(data, info, tenant, task_id)
            _write_durably(task_dir, MANIFEST, manifest.with_current(version, header_text(data)).to_bytes())
        return info

    def _sweep_task(self, tenant: str, task_id: str) -> int:
        task_dir = self._task_dir(tenant, task_id)
        with _io_errors(f"sweeping {tenant}/{task_id}"), self._locked(task_dir / LOCK):
            return self._tidy(task_dir, self._read_manifest(task_dir, tenant, task_id))

    def _tidy(self, task_dir: Path, manifest: Manifest | None) -> int:
        """Remove temp files and unreferenced version files. Caller holds the task lock.

        Under the lock no other writer is mid-write in this directory, so every temp file is a dead
        writer's, and every version file the manifest does not list was either never committed or
        already pruned/deleted — nobody can commit it any more.
        """
        keep = set() if manifest is None else {v.version for v in manifest.versions}
        removed = 0
        for name in os.listdir(task_dir):
            number = parse_version_name(name)
            if name.startswith(TMP_PREFIX) or (number is not None and number not in keep):
                removed += _unlink_quietly(task_dir / name)
        return removed

    @contextmanager
    def _locked(self, lock_file: Path) -> Iterator[None]:
        """Exclusive flock on a lock file (a task's, or a tenant's creation lock); polls so that waiting
        has a deadline.

        Each acquisition opens its own descriptor, so threads of one process exclude each other as
        well as other processes (flock locks belong to the open file description).
        """
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            deadline = time.monotonic() + self.lock_timeout
            delay = 0.0005
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise Conflict(
                            f"timed out after {self.lock_timeout:g}s waiting for the lock {lock_file}"
                        ) from None
                    time.sleep(delay)
                    delay = min(delay * 2, 0.02)
            yield
        finally:
            os.close(fd)  # releases the lock

    # ------------------------------------------------------------------------------------ reads
    def _load_manifest(self, tenant: str, task_id: str) -> Manifest | None:
        with _io_errors(f"reading {tenant}/{task_id}"):
            manifest = self._read_manifest(self._task_dir(tenant, task_id), tenant, task_id)
        if manifest is None:
            self._check_present()
        return manifest

    def _read_version(self, tenant: str, task_id: str, version: int) -> bytes | None:
        with _io_errors(f"reading {tenant}/{task_id} v{version}"):
            try:
                return _read_file(self._task_dir(tenant, task_id) / version_name(version))
            except FileNotFoundError:
                pass
        self._check_present()
        return None

    def _task_ids(self, tenant: str, after: str | None) -> list[str]:
        ids = _child_ids(self._tenants_dir / tenant / "tasks")
        if not ids:
            self._check_present()
        if after is not None:
            ids = [t for t in ids if listing_key(t) > listing_key(after)]
        return sorted(ids, key=listing_key)

    def _tenant_ids(self) -> list[str]:
        ids = _child_ids(self._tenants_dir)
        if not ids:
            self._check_present()
        return sorted(ids)

    # ---------------------------------------------------------------------------------- helpers
    def _task_dir(self, tenant: str, task_id: str) -> Path:
        # Both ids passed check_id: single path segments without "/" or a leading ".".
        return self._tenants_dir / tenant / "tasks" / task_id

    @staticmethod
    def _read_manifest(task_dir: Path, tenant: str, task_id: str) -> Manifest | None:
        try:
            data = _read_file(task_dir / MANIFEST)
        except FileNotFoundError:
            return None
        return Manifest.from_bytes(data, f"{tenant}/{task_id}")


# ------------------------------------------------------------------------------------ file helpers
@contextmanager
def _io_errors(what: str) -> Iterator[None]:
    """OS errors (disk full, permissions, I/O errors) become StoreUnavailable naming the operation."""
    try:
        yield
    except OSError as e:
        raise StoreUnavailable(f"{what}: {e}") from e


def _read_file(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(directory: Path, name: str, data: bytes) -> None:
    """Atomically create or replace directory/name: temp file, fsync, rename, fsync the directory.

    The directory fsync makes the rename itself durable before the caller's next step; without it a
    power cut could persist a later manifest rename but not the version file it points to.
    """
    tmp = directory / f"{TMP_PREFIX}{secrets.token_hex(8)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / name)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _fsync_dir(directory)


def _make_dirs(path: Path, base: Path | None = None) -> None:
    """mkdir -p that fsyncs the parent of every directory it creates (so the new entry survives power loss).

    With `base`, only directories below it are created: a missing `base` is StoreUnavailable.
    """
    if path.is_dir():
        return
    if path == base:
        raise StoreUnavailable(f"store directory {base} is missing")
    _make_dirs(path.parent, base)
    try:
        os.mkdir(path)
    except FileExistsError:
        return  # another process created it
    _fsync_dir(path.parent)


def _unlink_quietly(path: Path) -> int:
    try:
        os.unlink(path)
        return 1
    except FileNotFoundError:
        return 0


def _child_ids(directory: Path) -> list[str]:
    """Names in `directory` that are valid ids (anything else there is not ours to list)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    except OSError as e:
        if e.errno == errno.ENOTDIR:
            return []
        raise StoreUnavailable(f"listing {directory}: {e}") from e
    return [n for n in names if ID_PATTERN.fullmatch(n)]
