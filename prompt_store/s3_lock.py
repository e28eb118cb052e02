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
Last-Modified, one-second resolution, so one second of slack) or as how long this waiter itself has
seen the same ETag, whichever says older; neither overestimates, so client clock skew cannot cut a
lease short.

Fencing: S3 cannot make the holder's commit conditional on still holding the lock, so the holder
stops itself. Its lease starts before it sent the write that took the lock, so at or before the
object's Last-Modified; the `check` it gets refuses to start a commit once `ttl - request_bound` has
passed on its monotonic clock, where `request_bound` is the longest one S3 call of the store can take
(attempts × timeouts + botocore's backoff between them). A commit started in time is applied before
anyone may take the lock over. Not covered: a request that S3 applies later than the client's
timeouts allow (held for minutes in a proxy), or a server clock that jumps.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

from botocore.exceptions import ClientError

from prompt_store.base import Conflict, StoreUnavailable

__all__ = ["LOST_RACE", "MISSING", "S3Lease", "error_code", "request_bound"]

MISSING = frozenset({"NoSuchKey", "404", "NotFound"})
# 412: the condition failed. 409 ConditionalRequestConflict: AWS saw a concurrent conditional write to
# the same key and refused this one. Both mean "someone else got there first".
LOST_RACE = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict"})
HELD, FREE = "held", "free"
_CLOCK_RESOLUTION = 1.0  # seconds: HTTP dates (Date, Last-Modified) carry whole seconds


def error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


@dataclass(frozen=True)
class _Seen:
    """The lock object as one HEAD request found it."""

    etag: str
    state: str  # HELD or FREE; an object without our metadata counts as held
    token: str  # the token of the write that made this version of the object
    server_age: float | None  # seconds since Last-Modified on the server's clock; None if unknown


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
    ) -> None:
        """Args:
        client: the store's boto3 S3 client.
        bucket, key: where the lock object lives.
        ttl: seconds after which a held lock may be taken over (its holder presumed dead).
        request_bound: the longest one S3 call may take, retries included; < ttl.
        timeout: seconds to wait for the lock before raising Conflict.
        calls: the store's error translation (botocore failures → StoreUnavailable), given a label.
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

    @contextmanager
    def held(self) -> Iterator[Callable[[], None]]:
        """Take the lock (Conflict after `timeout`); yields the check to run right before a commit."""
        etag, started = self._acquire()
        try:
            yield lambda: self._check(started)
        finally:
            self._release(etag, started)

    def _acquire(self) -> tuple[str, float]:
        """Returns the ETag of our lock object and the monotonic time the lease started."""
        deadline = time.monotonic() + self.timeout
        sent: dict[str, float] = {}  # token of each write we made -> when it was sent
        first_seen: dict[str, float] = {}  # ETag -> when we first saw it held
        delay = 0.005
        while True:
            seen = self._head()
            if seen is not None and seen.state == HELD and seen.token in sent:
                return seen.etag, sent[seen.token]  # our write landed, its response was lost
            if seen is None:
                condition = {"IfNoneMatch": "*"}
            elif seen.state == FREE or self._expired(seen, first_seen):
                condition = {"IfMatch": seen.etag}
            else:
                condition = None
            if condition is not None:
                token = secrets.token_hex(16)
                sent[token] = time.monotonic()  # before sending: at or before the object's Last-Modified
                etag = self._write(HELD, token, condition)
                if etag is not None:
                    return etag, sent[token]
            if time.monotonic() >= deadline:
                raise Conflict(
                    f"timed out after {self.timeout:g}s waiting for the lock s3://{self.bucket}/{self.key}"
                )
            time.sleep(random.uniform(delay / 2, delay))  # jittered, so waiters do not move in step
            delay = min(delay * 2, 0.2)

    def _expired(self, seen: _Seen, first_seen: dict[str, float]) -> bool:
        watched = time.monotonic() - first_seen.setdefault(seen.etag, time.monotonic())
        server_old = seen.server_age is not None and seen.server_age > self.ttl + _CLOCK_RESOLUTION
        return server_old or watched > self.ttl

    def _check(self, started: float) -> None:
        held_for = time.monotonic() - started
        if held_for >= self.window:
            raise Conflict(
                f"held the lock s3://{self.bucket}/{self.key} for {held_for:.1f}s; after {self.window:g}s "
                "another writer may take it over, so nothing was committed"
            )

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
