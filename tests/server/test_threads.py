"""CPU placement of the engine and decode threads (server.threads)."""

from __future__ import annotations

import os
import threading

import pytest

from server.threads import available_cpus, engine_cpu_set, pin_thread

linux = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no thread affinity API")


@linux
def test_the_engine_gets_the_last_cpus_and_leaves_at_least_one():
    allowed = sorted(os.sched_getaffinity(0))
    assert available_cpus() == len(allowed)
    if len(allowed) >= 2:
        assert engine_cpu_set(1) == {allowed[-1]}
    assert engine_cpu_set(len(allowed)) == frozenset()  # no core left for the rest: no pinning
    assert engine_cpu_set(0) == frozenset()


@linux
def test_pin_thread_pins_only_the_calling_thread_and_what_it_starts():
    before = os.sched_getaffinity(0)
    cpu = min(before)
    seen: dict[str, set[int]] = {}

    def child() -> None:
        seen["child"] = os.sched_getaffinity(0)

    def worker() -> None:
        pin_thread(frozenset({cpu}))
        seen["worker"] = os.sched_getaffinity(0)
        t = threading.Thread(target=child)
        t.start()
        t.join()

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == {"worker": {cpu}, "child": {cpu}}
    assert os.sched_getaffinity(0) == before  # the caller of the thread is untouched
    pin_thread(frozenset())  # empty: no change
    assert os.sched_getaffinity(0) == before
