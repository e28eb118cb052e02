"""Concurrent writers (issue B, item 6): 4 threads sharing one store instance + 4 processes with their
own, 50 uploads each, over 3 overlapping tasks, while a reader thread keeps fetching.

Every upload carries distinct bytes, so each returned version can be matched to exactly one put.
Checked afterwards:
- all 400 puts succeeded and no version number was handed out twice per task;
- versions follow real time: if put A returned before put B started, A's version is lower (clocks are
  comparable because CLOCK_MONOTONIC is system-wide);
- the final state is consistent: current = highest version, the retained window is exactly the
  `KEEP` highest versions, each holding the bytes of the put that got that number, and each loads;
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
TENANT = "conc"
KEEP = 8

WRITER = r"""
import json, os, time
from prompt_store.url import open_store

a = ARGS
store = open_store(a["url"], **a["options"])
blobs = [open(p, "rb").read() for p in a["blobs"]]
records = []
for i, data in enumerate(blobs):
    task = a["tasks"][(a["writer"] + i) % len(a["tasks"])]
    t0 = time.monotonic()
    info = store.put(a["tenant"], task, data)
    t1 = time.monotonic()
    records.append({"writer": a["writer"], "i": i, "task": task, "version": info.version,
                    "sha256": info.sha256, "start": t0, "end": t1})
with open(a["out"], "w") as f:
    json.dump(records, f)
"""


def write_loop(store: PromptStore, writer: int, blobs: list[bytes]) -> list[dict[str, Any]]:
    """The in-process twin of WRITER."""
    records = []
    for i, data in enumerate(blobs):
        task = TASKS[(writer + i) % len(TASKS)]
        t0 = time.monotonic()
        info = store.put(TENANT, task, data)
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

    options = {**store_spec.options, "keep_versions": KEEP}
    shared = store_spec.open(keep_versions=KEEP)
    results: list[dict[str, Any]] = []
    errors: list[BaseException] = []
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
        args = {"url": store_spec.url, "options": options, "blobs": paths, "writer": w, "tasks": TASKS,
                "tenant": TENANT, "out": str(out)}  # fmt: skip
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
            errors.append(e)
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

    # --- every put succeeded, numbers unique per task
    assert len(results) == writers * PUTS
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        by_task[r["task"]].append(r)
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

    # --- final state
    store = store_spec.open(keep_versions=KEEP)
    for task, recs in by_task.items():
        info = store.info(TENANT, task)
        expected = sorted(recs, key=lambda r: r["version"])[-KEEP:]
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
    shared.close()

    print(
        f"[{store_spec.backend}] {writers} writers ({THREADS} threads + {PROCESSES} processes) x {PUTS} puts "
        f"over {len(TASKS)} tasks in {elapsed:.1f}s ({writers * PUTS / elapsed:.0f} puts/s); "
        f"reader: {reads['count']} verified gets; final versions "
        f"{ {t: max(r['version'] for r in rs) for t, rs in sorted(by_task.items())} }"
    )
    assert reads["count"] > 0
