"""Concurrent writers (issue B, item 6): 4 threads sharing the store instances + 4 processes with their
own, 50 uploads each, over 3 overlapping tasks, while a reader thread keeps fetching.

Every upload carries distinct bytes, so each returned version can be matched to exactly one put.
Two retention settings run side by side (one store instance per setting in every writer):
`LEDGER_TASKS` keep every version (keep_versions >= all puts), so nothing a put reported committed
may ever leave the store; `PRUNED_TASK` keeps the `KEEP` newest, so retention runs under contention.
Checked afterwards:
- all 400 puts succeeded and no version number was handed out twice per task;
- no lost commit: for the ledger tasks, the final manifest lists exactly the (version, sha256) of
  every put that returned, and each version's bytes are there. A writer that overwrites the manifest
  without the compare-and-swap (S3's If-Match) erases other writers' commits; before the ledger this
  test passed with such a writer, since a lost commit older than the final window left no trace;
- versions follow real time: if put A returned before put B started, A's version is lower (clocks are
  comparable because CLOCK_MONOTONIC is system-wide);
- the final state is consistent: current = highest version; the pruned task retains exactly the
  `KEEP` highest versions; each retained version holds the bytes of the put that got that number, and
  each loads;
- the local store hands out contiguous numbers (one lock per task); S3 may skip numbers, never reuse;
- nothing is left behind (`sweep()` finds no garbage);
- the reader never saw a torn artifact, an error, or the current version go backwards.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from prompt_store.artifact import load_artifact
from prompt_store.base import NotFound, PromptStore

THREADS = 4
PROCESSES = 4
PUTS = 50
TASKS = ["t0", "t1", "t2"]
LEDGER_TASKS = ["t0", "t1"]  # every version kept: each reported commit must still be there at the end
PRUNED_TASK = "t2"  # the KEEP newest kept: pruning under contention
TENANT = "conc"
KEEP = 8
KEEP_ALL = (THREADS + PROCESSES) * PUTS  # more than a task can ever get in this test
TASK_KEEP = {**{t: KEEP_ALL for t in LEDGER_TASKS}, PRUNED_TASK: KEEP}
assert set(TASK_KEEP) == set(TASKS)

WRITER = r"""
import json, os, time
from prompt_store.url import open_store

a = ARGS
# One instance per retention setting, shared by the tasks that use it.
stores = {keep: open_store(a["url"], **a["options"], keep_versions=keep) for keep in set(a["keep"].values())}
blobs = [open(p, "rb").read() for p in a["blobs"]]
records = []
for i, data in enumerate(blobs):
    task = a["tasks"][(a["writer"] + i) % len(a["tasks"])]
    t0 = time.monotonic()
    info = stores[a["keep"][task]].put(a["tenant"], task, data)
    t1 = time.monotonic()
    records.append({"writer": a["writer"], "i": i, "task": task, "version": info.version,
                    "sha256": info.sha256, "start": t0, "end": t1})
with open(a["out"], "w") as f:
    json.dump(records, f)
"""


def write_loop(stores: dict[int, PromptStore], writer: int, blobs: list[bytes]) -> list[dict[str, Any]]:
    """The in-process twin of WRITER (`stores`: one instance per keep_versions setting)."""
    records = []
    for i, data in enumerate(blobs):
        task = TASKS[(writer + i) % len(TASKS)]
        t0 = time.monotonic()
        info = stores[TASK_KEEP[task]].put(TENANT, task, data)
        t1 = time.monotonic()
        records.append(
            {"writer": writer, "i": i, "task": task, "version": info.version, "sha256": info.sha256,
             "start": t0, "end": t1}
        )  # fmt: skip
    return records


@pytest.mark.slow
def test_concurrent_writers_threads_and_processes(
    store_spec: Any, fork_server: Any, make_artifact: Callable[..., bytes], tmp_path: Path
) -> None:
    writers = THREADS + PROCESSES
    blobs = {w: [make_artifact(1000 * w + i) for i in range(PUTS)] for w in range(writers)}
    sha_to_blob = {hashlib.sha256(b).hexdigest(): b for bs in blobs.values() for b in bs}
    assert len(sha_to_blob) == writers * PUTS  # every put is distinguishable

    options = dict(store_spec.options)
    shared = {keep: store_spec.open(keep_versions=keep) for keep in set(TASK_KEEP.values())}
    results: list[dict[str, Any]] = []
    errors: list[BaseException] = []  # writer threads
    reader_errors: list[BaseException] = []
    lock = threading.Lock()

    # Children first (they start in parallel with the threads below).
    children = []
    for w in range(THREADS, writers):
        paths = []
        for i, data in enumerate(blobs[w]):
            path = tmp_path / f"w{w}-{i}.safetensors"
            path.write_bytes(data)
            paths.append(str(path))
        out = tmp_path / f"w{w}.json"
        args = {"url": store_spec.url, "options": options, "keep": TASK_KEEP, "blobs": paths, "writer": w,
                "tasks": TASKS, "tenant": TENANT, "out": str(out)}  # fmt: skip
        children.append((fork_server.spawn(WRITER, args, tmp_path / f"w{w}.log"), w, out))

    def thread_writer(w: int) -> None:
        try:
            records = write_loop(shared, w, blobs[w])
            with lock:
                results.extend(records)
        except BaseException as e:
            errors.append(e)

    stop = threading.Event()
    reads = {"count": 0, "misses": 0}

    def reader() -> None:
        last = defaultdict(int)
        reader_store = store_spec.open()
        try:
            while not stop.is_set():
                for task in TASKS:
                    try:
                        data, info = reader_store.get(TENANT, task)  # sha256-verified by the store
                    except NotFound:
                        reads["misses"] += 1  # before the first commit of that task
                        continue
                    load_artifact(data)
                    assert hashlib.sha256(data).hexdigest() == info.sha256
                    assert info.version >= last[task], (
                        f"{task}: current went from {last[task]} to {info.version}"
                    )
                    last[task] = info.version
                    reads["count"] += 1
                stop.wait(0.01)  # leave the (single-threaded) test S3 server mostly to the writers
        except BaseException as e:
            reader_errors.append(e)
        finally:
            reader_store.close()

    started = time.monotonic()
    threads = [threading.Thread(target=thread_writer, args=(w,)) for w in range(THREADS)]
    reader_thread = threading.Thread(target=reader)
    for t in [*threads, reader_thread]:
        t.start()
    for t in threads:
        t.join()
    for pid, w, out in children:
        sig, code = fork_server.wait(pid)
        log = (tmp_path / f"w{w}.log").read_text()
        assert (sig, code) == (None, 0), f"writer {w} failed:\n{log}"
        results.extend(json.loads(out.read_text()))
    elapsed = time.monotonic() - started
    stop.set()
    reader_thread.join()
    assert not errors, errors

    # --- every put succeeded
    assert len(results) == writers * PUTS
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        by_task[r["task"]].append(r)
    assert sorted(by_task) == TASKS

    # --- no lost commit: the ledger of every (version, sha256) that put() reported committed is what
    # the store holds (first, so that a lost commit is reported as such).
    store = store_spec.open(keep_versions=KEEP_ALL)  # reads only; no put through this instance
    infos = {task: store.info(TENANT, task) for task in TASKS}
    for task in LEDGER_TASKS:
        ledger = {(r["version"], r["sha256"]) for r in by_task[task]}
        stored = {(v.version, v.sha256) for v in infos[task].versions}
        lost = sorted(ledger - stored)
        assert not lost, (
            f"{task}: {len(lost)} of {len(ledger)} reported commits are missing from the store "
            f"(versions {[v for v, _ in lost][:20]}...)"
        )
        assert stored == ledger, (
            f"{task}: the store lists versions no put reported: {sorted(stored - ledger)}"
        )
    assert not reader_errors, reader_errors

    for task, recs in by_task.items():
        versions = [r["version"] for r in recs]
        assert len(set(versions)) == len(versions), f"{task}: a version number was handed out twice"
        # --- real-time order: a put that finished before another started got a lower number
        for a in recs:
            for b in recs:
                if a["end"] < b["start"]:
                    assert a["version"] < b["version"], f"{task}: {a} returned before {b} began"
        # --- per writer, its own puts to a task got increasing numbers
        for w in range(writers):
            mine = [r["version"] for r in sorted(recs, key=lambda r: r["i"]) if r["writer"] == w]
            assert mine == sorted(mine)
        if store_spec.backend == "local":
            assert sorted(versions) == list(range(1, len(versions) + 1))

    # --- final state: current = highest; the retained window (everything, or the KEEP highest);
    # every retained version holds its put's bytes and loads
    for task, recs in by_task.items():
        info = infos[task]
        expected = sorted(recs, key=lambda r: r["version"])[-TASK_KEEP[task] :]
        assert info.current_version == expected[-1]["version"]
        assert [(v.version, v.sha256) for v in info.versions] == [
            (r["version"], r["sha256"]) for r in expected
        ]
        for v in info.versions:
            data, got = store.get(TENANT, task, v.version)
            assert data == sha_to_blob[v.sha256] and got == v
            load_artifact(data)
    assert store.sweep() == 0, "writers left unreferenced data behind"
    store.close()
    for instance in shared.values():
        instance.close()

    print(
        f"[{store_spec.backend}] {writers} writers ({THREADS} threads + {PROCESSES} processes) x {PUTS} puts "
        f"over {len(TASKS)} tasks in {elapsed:.1f}s ({writers * PUTS / elapsed:.0f} puts/s); "
        f"reader: {reads['count']} verified gets; final versions "
        f"{ {t: max(r['version'] for r in rs) for t, rs in sorted(by_task.items())} }; "
        f"ledger: {sum(len(by_task[t]) for t in LEDGER_TASKS)} commits all present"
    )
    assert reads["count"] > 0
