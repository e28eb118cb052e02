"""Per-tenant request rate limits (token buckets), checked before a request body is read."""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import threading
import time
import zlib


class RateLimiter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant → (tokens, last refill time)

    def acquire(self, tenant: str, rate_per_s: float, burst: float) -> float:
        """Take one token; returns 0 on success, else the seconds until a token is available."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(tenant, (burst, now))
            tokens = min(burst, tokens + (now - last) * rate_per_s)
            if tokens >= 1.0:
                self._buckets[tenant] = (tokens - 1.0, now)
                return 0.0
            self._buckets[tenant] = (tokens, now)
            return (1.0 - tokens) / rate_per_s

    def close(self) -> None:
        """Nothing to free (the shared table's counterpart has a file)."""


class SharedRateLimiter:
    """The same token buckets, shared by every API-server process of one server: a rate limit holds for
    the whole server, however the kernel spreads the connections over the processes.

    The buckets live in a small file on tmpfs that every process maps; an `flock` on it orders the
    read-modify-write (a few microseconds). The kernel drops a lock whose holder died, so a killed API
    server cannot leave the others waiting. Open addressing by the tenant name's CRC32; a full table
    (more tenants than `SLOTS`) falls back to a bucket in this process.
    """

    SLOTS = 4096
    NAME = 128  # bytes of a tenant name (ids are at most 64 characters)
    _ENTRY = struct.Struct(f"<{NAME}sdd")  # name, tokens, last refill (time.monotonic: system-wide)

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        size = self.SLOTS * self._ENTRY.size
        if os.fstat(self._fd).st_size < size:
            os.ftruncate(self._fd, size)
        self._map = mmap.mmap(self._fd, size)
        self._fallback = RateLimiter()

    def acquire(self, tenant: str, rate_per_s: float, burst: float) -> float:
        """Take one token; returns 0 on success, else the seconds until a token is available."""
        name = tenant.encode()[: self.NAME]
        entry, size = self._ENTRY, self._ENTRY.size
        start = zlib.crc32(name) % self.SLOTS
        now = time.monotonic()
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            for probe in range(self.SLOTS):
                at = ((start + probe) % self.SLOTS) * size
                held, tokens, last = entry.unpack_from(self._map, at)
                held = held.rstrip(b"\0")
                if held and held != name:
                    continue
                if not held:
                    tokens, last = burst, now
                tokens = min(burst, tokens + (now - last) * rate_per_s)
                taken = tokens >= 1.0
                entry.pack_into(self._map, at, name, tokens - 1.0 if taken else tokens, now)
                return 0.0 if taken else (1.0 - tokens) / rate_per_s
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        return self._fallback.acquire(tenant, rate_per_s, burst)

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)
