"""S3 backend: the same layout and semantics as the local store, as keys in any S3-compatible bucket.

Keys under ``s3://<bucket>/<prefix>/`` (docs/store.md)::

    tenants/<tenant>/tasks/<task_id>/manifest.json          the commit point (see manifest.py)
    tenants/<tenant>/tasks/<task_id>/v000001.safetensors    immutable version data
    tenants/<tenant>/.create-lock                           lease lock of `put(max_tasks=…)` (s3_lock.py)

There are no locks in S3, so writers use the two conditional writes S3 offers (AWS since 2024; MinIO,
Cloudflare R2 and Ceph RGW implement them too):

1. *claim* a version number by creating its object with ``If-None-Match: *`` — at most one writer
   can create a given key, so a number is never handed out twice;
2. *commit* by replacing the manifest with ``If-Match: <etag read before>`` (``If-None-Match: *`` for
   a new task) — a compare-and-swap, so two writers can never both build on the same manifest.

A writer that loses the swap re-reads the manifest: if a higher version was committed meanwhile it
drops its claim and claims a fresh, higher number, so versions are committed in increasing order and
``put`` returns numbers that follow real time. Numbers may skip (a claim that lost, or a crashed
writer's orphan) but are never reused. A version object whose number is at most the manifest's
``last_version`` and that the manifest does not list can never be committed any more, so any writer
may delete it; that is how crash leftovers and pruned versions are collected.

A put with a task limit that creates a task holds the tenant's lease lock (s3_lock.py: conditional
writes, an expiry for crashed holders, and a holder that will not commit once its lease may have
run out) across counting the tenant's tasks and committing the new manifest.

Timeouts and bounded retries (botocore "standard" mode) make an unreachable endpoint fail with
StoreUnavailable within seconds instead of hanging a request.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, suppress
from typing import TYPE_CHECKING, Any

import boto3
import botocore.loaders
import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from prompt_store.base import (
    DEFAULT_KEEP_VERSIONS,
    Conflict,
    NotFound,
    PromptStore,
    StoreError,
    StoreUnavailable,
    VersionInfo,
    verify_integrity,
)
from prompt_store.ids import ID_PATTERN
from prompt_store.manifest import Manifest, header_text, parse_version_name, version_name
from prompt_store.s3_lock import LOST_RACE, MISSING, S3Lease, Sightings, error_code, request_bound

if TYPE_CHECKING:
    from prompt_store.artifact import ArtifactLimits

__all__ = ["S3Store"]

MANIFEST = "manifest.json"
CREATE_LOCK = ".create-lock"
_MAX_CLAIM_SKIPS = 64  # version numbers a claim may skip (orphans / concurrent claims) before giving up


class S3Store(PromptStore):
    """Prompt store in an S3-compatible bucket (AWS S3, MinIO, R2, Ceph RGW, moto)."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        profile: str | None = None,
        addressing_style: str | None = None,
        connect_timeout: float = 2.0,
        read_timeout: float = 5.0,
        max_attempts: int = 3,
        max_pool_connections: int = 16,
        commit_attempts: int = 32,
        lock_ttl: float | None = None,
        lock_timeout: float = 30.0,
        keep_versions: int = DEFAULT_KEEP_VERSIONS,
        limits: ArtifactLimits | None = None,
    ) -> None:
        """Args:
        bucket: bucket name (must exist; the store never creates buckets).
        prefix: key prefix inside the bucket ("" for the bucket root).
        endpoint_url: S3 API endpoint for non-AWS services (None: boto3's default / AWS_ENDPOINT_URL).
        region, access_key_id, secret_access_key, session_token, profile: override boto3's standard
            credential chain (AWS_* environment variables, shared config, instance roles).
        addressing_style: "path" | "virtual" | "auto"; default "path" with a custom endpoint (what
            MinIO and loopback servers need), "auto" otherwise.
        connect_timeout, read_timeout: seconds per HTTP attempt.
        max_attempts: total HTTP attempts per call (botocore standard retry mode, with backoff).
        max_pool_connections: HTTP connection pool size (the store is shared by threads).
        commit_attempts: manifest compare-and-swap attempts before a put/delete/rollback raises Conflict.
        lock_ttl: seconds after which a tenant's creation lock (put with max_tasks) is presumed
            abandoned and may be taken over; must exceed the longest S3 call (max_attempts ×
            (connect_timeout + read_timeout) + backoff). None: 60 s, or twice that bound if more.
        lock_timeout: seconds a creating put waits for that lock before raising Conflict.
        keep_versions: newest versions kept per task (the current one is always kept).
        limits: `ArtifactLimits` applied to uploads (None: the format's defaults).
        """
        super().__init__(keep_versions=keep_versions, limits=limits)
        if not bucket or "/" in bucket:
            raise ValueError(f"invalid bucket name {bucket!r}")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.commit_attempts = commit_attempts
        self._request_bound = request_bound(max_attempts, connect_timeout, read_timeout)
        self.lock_ttl = float(lock_ttl) if lock_ttl is not None else max(60.0, 2 * self._request_bound)
        if self.lock_ttl <= self._request_bound:
            raise ValueError(
                f"lock_ttl {self.lock_ttl:g}s must exceed the longest S3 call of this store "
                f"({self._request_bound:g}s: max_attempts × (connect_timeout + read_timeout) + backoff)"
            )
        self.lock_timeout = float(lock_timeout)
        self._lock_sightings = Sightings()  # creation locks seen held, across acquires
        self._base = f"{self.prefix}/" if self.prefix else ""
        config = Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            max_pool_connections=max_pool_connections,
            s3={"addressing_style": addressing_style or ("path" if endpoint_url else "auto")},
        )
        with self._calls("configuring the S3 client"):
            core = botocore.session.get_session()  # a new one: credentials below must not leak to others
            core.register_component("data_loader", _shared_loader())
            session = boto3.session.Session(
                botocore_session=core,
                aws_access_key_id=access_key_id,
                aws_secret_access_key=secret_access_key,
                aws_session_token=session_token,
                region_name=region,
                profile_name=profile,
            )
            self._client = session.client("s3", endpoint_url=endpoint_url, config=config)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def __repr__(self) -> str:
        return (
            f"S3Store({self.url!r}, endpoint_url={self.endpoint_url!r}, keep_versions={self.keep_versions})"
        )

    def ping(self) -> None:
        with self._calls(f"checking bucket {self.bucket}"):
            self._client.head_bucket(Bucket=self.bucket)

    def close(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False)
                self._pool = None
        self._client.close()

    def current_version(self, tenant: str, task_id: str) -> int:
        """One HEAD request: the manifest carries the current version as object metadata."""
        tenant, task_id = self._check(tenant, task_id)
        with self._calls(f"reading {tenant}/{task_id}"):
            try:
                head = self._client.head_object(Bucket=self.bucket, Key=self._manifest_key(tenant, task_id))
            except ClientError as e:
                if error_code(e) in MISSING:
                    raise NotFound(tenant, task_id) from None
                raise
        value = head.get("Metadata", {}).get("current-version")
        if value is None:  # written by something else than this class: fall back to the body
            return super().current_version(tenant, task_id)
        if value == "0":
            raise NotFound(tenant, task_id)
        return int(value)

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
        header = header_text(data)
        claimed: int | None = None
        attempted: VersionInfo | None = None
        # Numbers we skipped (taken when we tried them) or gave up: once a manifest with a higher
        # last_version is committed, those not listed in it are garbage, deleted after our commit.
        passed_over: set[int] = set()
        for attempt in range(self.commit_attempts):
            if attempt:
                _backoff(attempt)
            previous, etag = self._get_manifest(tenant, task_id)
            last = previous.last_version if previous else 0
            if claimed is not None and claimed <= last:
                assert previous is not None
                if attempted is not None and previous.record(claimed) == attempted:
                    # Our swap did land; its response was lost and botocore's retry got a 412.
                    return attempted
                # A newer version was committed while we held `claimed`: ours can never be committed
                # now (versions commit in increasing order), so give it up and claim a higher number.
                passed_over.add(claimed)
                claimed = None
            if live_only and (previous is None or previous.deleted):
                # The compare-and-swap below makes this check atomic with the commit: a delete that
                # lands in between fails the swap, and the re-read ends up here.
                self._drop_claim(tenant, task_id, claimed)
                return None
            if claimed is None:
                claimed = self._claim(tenant, task_id, last + 1, data)
                passed_over.update(range(last + 1, claimed))
            attempted = VersionInfo(version=claimed, sha256=sha256, size=len(data), created=time.time())
            manifest, dropped = Manifest.after_put(
                previous, tenant, task_id, attempted, header, self.keep_versions
            )
            if check is not None:
                try:
                    check()
                except StoreError:  # the lease may have run out: this claim will never be committed
                    self._drop_claim(tenant, task_id, claimed)
                    raise
            if self._swap_manifest(tenant, task_id, manifest, etag):
                listed = {v.version for v in manifest.versions}
                doomed = sorted(set(dropped) | {v for v in passed_over if v not in listed})
                # After the commit, so a failure here only leaves garbage for sweep(), never a
                # manifest that points at missing data.
                with suppress(StoreUnavailable):
                    self._delete_keys([self._version_key(tenant, task_id, v) for v in doomed])
                return attempted
        self._drop_claim(tenant, task_id, claimed)
        raise Conflict(
            f"{tenant}/{task_id}: lost {self.commit_attempts} manifest swaps in a row to other writers"
        )

    def _drop_claim(self, tenant: str, task_id: str, claimed: int | None) -> None:
        """Delete a claimed version object we will not commit (best effort: sweep() finds it later)."""
        if claimed is not None:
            with suppress(StoreUnavailable):
                self._delete_keys([self._version_key(tenant, task_id, claimed)])

    def _creation_lock(self, tenant: str) -> AbstractContextManager[Callable[[], None]]:
        lease = S3Lease(
            self._client,
            self.bucket,
            f"{self._base}tenants/{tenant}/{CREATE_LOCK}",
            ttl=self.lock_ttl,
            request_bound=self._request_bound,
            timeout=self.lock_timeout,
            calls=self._calls,
            sightings=self._lock_sightings,
        )
        return lease.held()

    def _claim(self, tenant: str, task_id: str, first: int, data: bytes) -> int:
        """Create the first free version object at or after `first`; returns its number."""
        for version in range(first, first + _MAX_CLAIM_SKIPS):
            key = self._version_key(tenant, task_id, version)
            with self._calls(f"writing {tenant}/{task_id} v{version}"):
                try:
                    self._client.put_object(
                        Bucket=self.bucket,
                        Key=key,
                        Body=data,
                        ContentType="application/octet-stream",
                        IfNoneMatch="*",
                    )
                    return version
                except ClientError as e:
                    if error_code(e) not in LOST_RACE:
                        raise
        raise Conflict(
            f"{tenant}/{task_id}: version numbers {first}..{first + _MAX_CLAIM_SKIPS - 1} are all taken"
        )

    def _delete(self, tenant: str, task_id: str) -> None:
        swapped = False
        for attempt in range(self.commit_attempts):
            if attempt:
                _backoff(attempt)
            manifest, etag = self._get_manifest(tenant, task_id)
            if manifest is None or manifest.deleted:
                if swapped and manifest is not None:
                    # Our tombstone landed but its response was lost; the task is gone either way.
                    break
                raise NotFound(tenant, task_id)
            tombstone = manifest.tombstone()
            swapped = True
            if self._swap_manifest(tenant, task_id, tombstone, etag):
                manifest = tombstone
                break
        else:
            raise Conflict(f"{tenant}/{task_id}: lost {self.commit_attempts} manifest swaps in a row")
        self._collect(tenant, task_id, manifest)

    def _set_current(self, tenant: str, task_id: str, version: int) -> VersionInfo:
        for attempt in range(self.commit_attempts):
            if attempt:
                _backoff(attempt)
            manifest, etag = self._get_manifest(tenant, task_id)
            if manifest is None or manifest.deleted:
                raise NotFound(tenant, task_id)
            info = manifest.record(version)
            if info is None:
                raise NotFound(tenant, task_id, version)
            if manifest.current == version:
                return info
            data = self._read_version(tenant, task_id, version)
            if data is None:
                continue  # pruned by a concurrent put; the re-read manifest will say so
            verify_integrity(data, info, tenant, task_id)
            if self._swap_manifest(tenant, task_id, manifest.with_current(version, header_text(data)), etag):
                return info
        raise Conflict(f"{tenant}/{task_id}: lost {self.commit_attempts} manifest swaps in a row")

    def _sweep_task(self, tenant: str, task_id: str) -> int:
        manifest, _ = self._get_manifest(tenant, task_id)
        return self._collect(tenant, task_id, manifest)

    def _collect(self, tenant: str, task_id: str, manifest: Manifest | None) -> int:
        """Delete version objects that can never be (or are no longer) referenced; returns the count.

        Only numbers up to the manifest's last_version are touched: a higher-numbered object may be
        another writer's claim that is about to be committed.
        """
        last = manifest.last_version if manifest is not None else 0
        keep = set() if manifest is None else {v.version for v in manifest.versions}
        prefix = self._task_prefix(tenant, task_id)
        garbage = []
        with self._calls(f"listing {tenant}/{task_id}"):
            for page in self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix
            ):
                for obj in page.get("Contents", []):
                    number = parse_version_name(obj["Key"][len(prefix) :])
                    if number is not None and number <= last and number not in keep:
                        garbage.append(obj["Key"])
        self._delete_keys(garbage)
        return len(garbage)

    def _delete_keys(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            chunk = keys[start : start + 1000]
            with self._calls("deleting objects"):
                result = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True}
                )
            errors = result.get("Errors", [])
            if errors:
                first = errors[0]
                raise StoreUnavailable(
                    f"deleting {first.get('Key')}: {first.get('Code')} {first.get('Message')}"
                )

    # ------------------------------------------------------------------------------------ reads
    def _get_manifest(self, tenant: str, task_id: str) -> tuple[Manifest | None, str | None]:
        """The manifest and its ETag (for the compare-and-swap), or (None, None)."""
        with self._calls(f"reading {tenant}/{task_id}"):
            try:
                response = self._client.get_object(
                    Bucket=self.bucket, Key=self._manifest_key(tenant, task_id)
                )
            except ClientError as e:
                if error_code(e) in MISSING:
                    return None, None
                raise
            body = response["Body"].read()
        return Manifest.from_bytes(body, f"{tenant}/{task_id}"), response["ETag"]

    def _swap_manifest(self, tenant: str, task_id: str, manifest: Manifest, etag: str | None) -> bool:
        """Replace the manifest iff it still has `etag` (or create it iff absent); False if we lost."""
        condition = {"IfMatch": etag} if etag is not None else {"IfNoneMatch": "*"}
        with self._calls(f"committing {tenant}/{task_id}"):
            try:
                self._client.put_object(
                    Bucket=self.bucket,
                    Key=self._manifest_key(tenant, task_id),
                    Body=manifest.to_bytes(),
                    ContentType="application/json",
                    # Lets current_version() answer from a HEAD request; "0" marks a tombstone.
                    Metadata={"current-version": str(manifest.current or 0)},
                    **condition,
                )
                return True
            except ClientError as e:
                # If-Match on a manifest deleted meanwhile answers 404: also "someone else changed it".
                if error_code(e) in LOST_RACE or error_code(e) in MISSING:
                    return False
                raise

    def _load_manifest(self, tenant: str, task_id: str) -> Manifest | None:
        return self._get_manifest(tenant, task_id)[0]

    def _load_manifests(self, tenant: str, task_ids: list[str]) -> list[Manifest | None]:
        # One round trip per manifest; overlap them so a listing page costs ~one latency, not N.
        if len(task_ids) <= 1:
            return [self._load_manifest(tenant, t) for t in task_ids]
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="s3-store")
            pool = self._pool
        return list(pool.map(lambda t: self._load_manifest(tenant, t), task_ids))

    def _read_version(self, tenant: str, task_id: str, version: int) -> bytes | None:
        with self._calls(f"reading {tenant}/{task_id} v{version}"):
            try:
                response = self._client.get_object(
                    Bucket=self.bucket, Key=self._version_key(tenant, task_id, version)
                )
            except ClientError as e:
                if error_code(e) in MISSING:
                    return None
                raise
            return response["Body"].read()

    def _task_ids(self, tenant: str, after: str | None) -> Iterator[str]:
        prefix = f"{self._base}tenants/{tenant}/tasks/"
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "Delimiter": "/"}
        if after is not None:
            # Every key under "<after>/" is made of [a-z0-9._/-], all below "~", so this skips the
            # cursor's own keys and nothing else (S3 orders keys by bytes, as ids.listing_key does).
            kwargs["StartAfter"] = f"{prefix}{after}/~"
        yield from self._common_prefixes(kwargs, prefix)

    def _tenant_ids(self) -> Iterator[str]:
        prefix = f"{self._base}tenants/"
        yield from self._common_prefixes({"Bucket": self.bucket, "Prefix": prefix, "Delimiter": "/"}, prefix)

    def _common_prefixes(self, kwargs: dict[str, Any], prefix: str) -> Iterator[str]:
        with self._calls(f"listing {prefix}"):
            for page in self._client.get_paginator("list_objects_v2").paginate(**kwargs):
                for entry in page.get("CommonPrefixes", []):
                    name = entry["Prefix"][len(prefix) : -1]
                    if ID_PATTERN.fullmatch(name):
                        yield name

    # ---------------------------------------------------------------------------------- helpers
    def _task_prefix(self, tenant: str, task_id: str) -> str:
        return f"{self._base}tenants/{tenant}/tasks/{task_id}/"

    def _manifest_key(self, tenant: str, task_id: str) -> str:
        return self._task_prefix(tenant, task_id) + MANIFEST

    def _version_key(self, tenant: str, task_id: str, version: int) -> str:
        return self._task_prefix(tenant, task_id) + version_name(version)

    @contextmanager
    def _calls(self, what: str) -> Iterator[None]:
        """botocore / network failures that escape the handlers above become StoreUnavailable."""
        try:
            yield
        except ClientError as e:
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            raise StoreUnavailable(
                f"{what}: S3 error {error_code(e)} (HTTP {status}) from {self.endpoint_url or 'AWS'}: {e}"
            ) from e
        except (BotoCoreError, OSError) as e:
            raise StoreUnavailable(f"{what}: cannot reach S3 at {self.endpoint_url or 'AWS'}: {e}") from e


_loader: botocore.loaders.Loader | None = None
_loader_lock = threading.Lock()


def _shared_loader() -> botocore.loaders.Loader:
    # Parsing S3's service model takes ~0.3 s per botocore session; one loader (which caches what it
    # parsed) shared by every store makes opening further stores, and forked workers, cheap.
    global _loader
    with _loader_lock:
        if _loader is None:
            _loader = botocore.loaders.create_loader()
        return _loader


def _backoff(attempt: int) -> None:
    # Full jitter (AWS architecture blog, "Exponential Backoff and Jitter"): writers that just lost a
    # swap to each other spread out instead of colliding again on the next round.
    time.sleep(random.uniform(0, min(0.25, 0.004 * 2**attempt)))
