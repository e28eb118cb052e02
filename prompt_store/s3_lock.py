"""A lease lock in an S3 bucket, made of conditional writes: the S3 store's per-tenant creation lock.

S3 has no locks. The lock is one object, taken with the two conditional writes the store already
commits with (s3.py): ``If-None-Match: *`` while there is no lock object, ``If-Match: <etag>`` to
take over a free one or an expired one; either succeeds for one writer only. Terraform's S3 backend
locks its state the same way (``use_lockfile``, since 1.10: a ``.tflock`` object written with
If-None-Match).

The object's metadata records its state (held / free) and a random token, which its body repeats, so
every write of the lock has its own ETag. It is released by writing "free" with If-Match on our own
ETag, never by DELETE: a delete that botocore retries after a lost response could remove the *next*
holder's lock, while a retried conditional write just fails. A write whose response was lost is
recognised by its token on the next read, as the store does for its manifest swaps.

Expiry, so that a crashed holder cannot block the tenant for good: a held lock older than `ttl` may be
taken over. Age is measured on the S3 server's clock (the response's Date minus the object's
Last-Modified, one-second resolution, so one second of slack) or as how long this store instance has
seen the same version of the lock held (`Sightings`: kept across acquires, since one acquire gives up
after `timeout`, usually shorter than `ttl`), whichever says older; neither overestimates, so client
clock skew cannot cut a lease short. The second is what expires a lease when the server's age is not
available (a gateway that strips Date).

Fencing: S3 cannot make the holder's commit conditional on still holding the lock, so the holder
stops itself. Its lease starts before it sent the write that took the lock, so at or before the
object's Last-Modified; the `check` it gets refuses to start a commit once `ttl - request_bound` has
passed on its monotonic clock, where `request_bound` is the longest one S3 call of the store can take
(attempts × timeouts + botocore's backoff between them). A commit started in time is applied before
anyone may take the lock over. Not covered: a request that S3 applies later than the client's
timeouts allow (held for minutes in a proxy), or a server clock that jumps. A holder whose own work
outlasts that window gets StoreUnavailable (the store answered too slowly for a create), not Conflict:
nobody else was in the way, so retrying at once would not help.

An acquiring write that fails with StoreUnavailable may still have landed (its response lost, then
the retries failed); before the error is raised, one HEAD looks for our token and frees the lock if it
is ours, instead of leaving it held for a full `ttl`.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

from botocore.exceptions import ClientError

from prompt_store.base import Conflict, StoreUnavailable

__all__ = ["LOST_RACE", "MISSING", "S3Lease", "Sightings", "error_code", "expired", "request_bound"]

MISSING = frozenset({"NoSuchKey", "404", "NotFound"})
# 412: the condition failed. 409 ConditionalRequestConflict: AWS saw a concurrent conditional write to
# the same key and refused this one. Both mean "someone else got there first".
LOST_RACE = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict"})
HELD, FREE = "held", "free"
_CLOCK_RESOLUTION = 1.0  # seconds: HTTP dates (Date, Last-Modified) carry whole seconds
_MAX_SIGHTINGS = 10_000  # locks of other holders remembered per store instance; forgetting only delays


def error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


@dataclass(frozen=True)
class _Seen:
    """The lock object as one HEAD request found it."""

    etag: str
    state: str  # HELD or FREE; an object without our metadata counts as held
    token: str  # the token of the write that made this version of the object
    server_age: float | None  # seconds since Last-Modified on the server's clock; None if unknown


def expired(server_age: float | None, watched: float, ttl: float) -> bool:
    """Whether a held lock may be taken over: older than `ttl` on the server's clock (`server_age`,
    None when the response had no usable Date), or watched held, unchanged, for longer than `ttl` by
    this store instance. Both are lower bounds of the lock's true age."""
    server_old = server_age is not None and server_age > ttl + _CLOCK_RESOLUTION
    return server_old or watched > ttl


class Sightings:
    """When this store instance first saw each lock key held in its present version (ETag and token).

    Shared by the store's acquires, so the watch goes on across them: one acquire gives up after its
    timeout, usually shorter than the ttl, and a watch that began anew with each acquire could never
    reach the ttl. A key is dropped once the lock is seen free or taken by us; the table is capped,
    and forgetting a key only makes the watch start again (later expiry, never earlier).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._first: dict[str, tuple[str, str, float]] = {}  # key -> (etag, token, first seen)

    def watched(self, key: str, etag: str, token: str, now: float) -> float:
        """Seconds since this version of the lock was first seen held (0 the first time). `now` must
        be read after the response that showed it."""
        with self._lock:
            seen = self._first.get(key)
            if seen is None or seen[:2] != (etag, token):  # a new holder, or a new write of the lock
                if seen is None and len(self._first) >= _MAX_SIGHTINGS:
                    del self._first[next(iter(self._first))]  # the oldest entry
                seen = self._first[key] = (etag, token, now)
            return now - seen[2]

    def forget(self, key: str) -> None:
        with self._lock:
            self._first.pop(key, None)

    def __len__(self) -> int:
        return len(self._first)


class S3Lease:
    """An exclusive lease on one S3 key; `held()` is the context manager that takes and releases it."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        key: str,
        *,
        ttl: float,
        request_bound: float,
        timeout: float,
        calls: Callable[[str], AbstractContextManager[None]],
        sightings: Sightings,
    ) -> None:
        """Args:
        client: the store's boto3 S3 client.
        bucket, key: where the lock object lives.
        ttl: seconds after which a held lock may be taken over (its holder presumed dead).
        request_bound: the longest one S3 call may take, retries included; < ttl.
        timeout: seconds to wait for the lock before raising Conflict.
        calls: the store's error translation (botocore failures → StoreUnavailable), given a label.
        sightings: the store instance's record of locks seen held, shared by all its leases.
        """
        if not request_bound < ttl:
            raise ValueError(f"lock ttl {ttl:g}s must exceed the longest S3 call, {request_bound:g}s")
        self._client = client
        self.bucket = bucket
        self.key = key
        self.ttl = ttl
        self.window = ttl - request_bound  # how long after taking the lock its holder may start a commit
        self.timeout = timeout
        self._calls = calls
        self._sightings = sightings

    @contextmanager
    def held(self) -> Iterator[Callable[[], None]]:
        """Take the lock (Conflict after `timeout`); yields the check to run while holding it (before
        each step of the count, and right before the commit): StoreUnavailable once the lease may have
        run out."""
        etag, started = self._acquire()
        try:
            yield lambda: self._check(started)
        finally:
            self._release(etag, started)

    def _acquire(self) -> tuple[str, float]:
        """Returns the ETag of our lock object and the monotonic time the lease started."""
        deadline = time.monotonic() + self.timeout
        sent: dict[str, float] = {}  # token of each write we made -> when it was sent
        delay = 0.005
        while True:
            seen = self._head()
            if seen is not None and seen.state == HELD and seen.token in sent:
                self._sightings.forget(self.key)
                return seen.etag, sent[seen.token]  # our write landed, its response was lost
            if seen is None or seen.state == FREE:
                self._sightings.forget(self.key)
                condition = {"IfNoneMatch": "*"} if seen is None else {"IfMatch": seen.etag}
            else:
                watched = self._sightings.watched(self.key, seen.etag, seen.token, time.monotonic())
                condition = {"IfMatch": seen.etag} if expired(seen.server_age, watched, self.ttl) else None
            if condition is not None:
                token = secrets.token_hex(16)
                sent[token] = time.monotonic()  # before sending: at or before the object's Last-Modified
                try:
                    etag = self._write(HELD, token, condition)
                except StoreUnavailable:
                    self._free_if_ours(sent)
                    raise
                if etag is not None:
                    self._sightings.forget(self.key)
                    return etag, sent[token]
            if time.monotonic() >= deadline:
                raise Conflict(
                    f"timed out after {self.timeout:g}s waiting for the lock s3://{self.bucket}/{self.key}"
                )
            time.sleep(random.uniform(delay / 2, delay))  # jittered, so waiters do not move in step
            delay = min(delay * 2, 0.2)

    def _check(self, started: float) -> None:
        held_for = time.monotonic() - started
        if held_for >= self.window:
            # Our own reads and writes took this long; nobody else was in the way (that would have been
            # Conflict while waiting). A retry at once would most likely run out of time again.
            raise StoreUnavailable(
                f"held the creation lock s3://{self.bucket}/{self.key} for {held_for:.1f}s, past the "
                f"{self.window:g}s its holder may use before it can expire (lock_ttl {self.ttl:g}s less "
                "the longest S3 call), so nothing was committed: counting the tenant's tasks (deleted "
                "ones included) and committing took too long at this store's latency. A larger lock_ttl "
                "allows more"
            )

    def _free_if_ours(self, tokens: Collection[str]) -> None:
        """After an acquiring write failed: if it (or an earlier one of this acquire) landed anyway,
        free the lock now rather than leave it held for a full ttl. Best effort (S3 may well be
        unreachable); the If-Match on the ETag read with one of our tokens frees our own write and
        nobody else's."""
        with suppress(StoreUnavailable):
            seen = self._head()
            if seen is not None and seen.state == HELD and seen.token in tokens:
                self._write(FREE, secrets.token_hex(16), {"IfMatch": seen.etag})

    def _release(self, etag: str, started: float) -> None:
        if time.monotonic() - started >= self.window:
            return  # it may be someone else's by now; if not, it expires
        # If this fails the lock stays held until it expires: the caller's commit stands either way.
        with suppress(StoreUnavailable):
            self._write(FREE, secrets.token_hex(16), {"IfMatch": etag})

    def _head(self) -> _Seen | None:
        with self._calls(f"reading the lock {self.key}"):
            try:
                head = self._client.head_object(Bucket=self.bucket, Key=self.key)
            except ClientError as e:
                if error_code(e) in MISSING:
                    return None
                raise
        meta = head.get("Metadata", {})
        server_age = None
        date = head.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        with suppress(TypeError, ValueError):
            server_age = (parsedate_to_datetime(date) - head["LastModified"]).total_seconds()
        return _Seen(
            etag=head["ETag"],
            state=meta.get("state", HELD),
            token=meta.get("token", ""),
            server_age=server_age,
        )

    def _write(self, state: str, token: str, condition: dict[str, str]) -> str | None:
        """One conditional PUT of the lock object; its ETag, or None if the condition failed."""
        body = {
            "state": state,
            "token": token,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "time": time.time(),
        }
        with self._calls(f"writing the lock {self.key}"):
            try:
                response = self._client.put_object(
                    Bucket=self.bucket,
                    Key=self.key,
                    Body=json.dumps(body).encode(),
                    ContentType="application/json",
                    Metadata={"state": state, "token": token},
                    **condition,
                )
            except ClientError as e:
                # If-Match on a lock object deleted meanwhile answers 404: also "someone else changed it".
                if error_code(e) in LOST_RACE or error_code(e) in MISSING:
                    return None
                raise
        return str(response["ETag"])


def request_bound(max_attempts: int, connect_timeout: float, read_timeout: float) -> float:
    """The longest one call of a botocore client (standard retry mode) can take, in seconds: every
    attempt at its timeouts, plus the backoff before each retry (at most min(2**i, 20) s)."""
    backoff = sum(min(2.0**i, 20.0) for i in range(max_attempts - 1))
    return max_attempts * (connect_timeout + read_timeout) + backoff
