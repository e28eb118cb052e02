"""CPU placement of the server's own threads (Linux; a no-op elsewhere)."""

from __future__ import annotations

import contextlib
import ctypes
import os


def available_cpus() -> int:
    """CPUs this process may run on (its affinity set: a container's cpuset, `taskset`), not the host's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def engine_cpu_set(engine_threads: int) -> frozenset[int]:
    """The last `engine_threads` CPUs this process may use, for the engine thread; empty (no pinning)
    when that would leave no other CPU, or without an affinity API."""
    if not hasattr(os, "sched_getaffinity"):
        return frozenset()
    allowed = sorted(os.sched_getaffinity(0))
    if engine_threads < 1 or len(allowed) <= engine_threads:
        return frozenset()
    return frozenset(allowed[-engine_threads:])


def pin_thread(cpus: frozenset[int]) -> None:
    """Restrict the calling thread (only it: Linux affinity is per thread) to `cpus`; empty: leave it.

    Threads it starts later inherit the set, which is how torch's intra-op threads follow the engine's.
    """
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)


def pin_process(cpus: frozenset[int]) -> None:
    """Restrict every thread of this process to `cpus` (threads started later inherit it from their
    creator); empty: leave them."""
    if not cpus or not hasattr(os, "sched_setaffinity"):
        return
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # the thread ended meanwhile
            os.sched_setaffinity(int(tid), cpus)


def name_process(name: str) -> None:
    """Name this process as `ps`, `top` and /proc/<pid>/comm show it (Linux; 15 bytes), so an operator
    (and `benchmarks.frontend`) tells the engine core, the API servers and the engine process apart."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass
