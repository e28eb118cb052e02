"""`put(..., max_tasks=N)`: a tenant's task limit holds under concurrent creates.

The count of the tenant's live tasks and the creation of a new one are one step under the tenant's
creation lock (local: flock on `tenants/<t>/.create-lock`; S3: a lease object written with conditional
writes, prompt_store/s3_lock.py). Each race starts at LIMIT - 2 live tasks and lets RACERS writers
create a new task each at the same moment: exactly 2 may succeed, the others get TaskLimitReached,
and the tenant ends with exactly LIMIT tasks. The race is run several times per test, from threads
sharing one store instance, from threads on two instances (two replicas), and from separate
processes with their own instances, on both backends. With the lock made a no-op, these tests fail:
several writers count LIMIT - 2 before any of them commits and all create.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from prompt_store.base import Conflict, PromptStore, StoreUnavailable, TaskLimitReached
from prompt_store.s3_lock import Sightings, expired

Make = Callable[..., bytes]
TENANT = "lim"
LIMIT = 8
RACERS = 8
ROUNDS = 3


def fill(store: PromptStore, make_artifact: Make, n: int) -> list[str]:
    ids = [f"old-{i}" for i in range(n)]
    for i, task_id in enumerate(ids):
        store.put(TENANT, task_id, make_artifact(i))
    return ids


def race_threads(
    stores: list[PromptStore], make_artifact: Make, new_ids: list[str], version_of: list[str] = ()
) -> dict[str, str]:
    """Writer i creates `new_ids[i]` through `stores[i % len(stores)]`; writers for `version_of` add a
    new version to those live tasks. All start at one barrier. Returns task id -> outcome."""
    jobs = [(task_id, 1000 + i) for i, task_id in enumerate(new_ids)]
    jobs += [(task_id, 2000 + i) for i, task_id in enumerate(version_of)]
    blobs = [make_artifact(seed) for _, seed in jobs]
    barrier = threading.Barrier(len(jobs))
    outcomes: dict[str, str] = {}

    def writer(i: int) -> None:
        task_id = jobs[i][0]
        store = stores[i % len(stores)]
        barrier.wait()
        try:
            store.put(TENANT, task_id, blobs[i], max_tasks=LIMIT)
            outcomes[task_id] = "created"
        except TaskLimitReached as e:
            assert (e.tenant, e.max_tasks) == (TENANT, LIMIT)
            outcomes[task_id] = "refused"
        except BaseException as e:  # reported below, not swallowed by the thread
            outcomes[task_id] = f"error: {e!r}"

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def check_round(store: PromptStore, outcomes: dict[str, str], new_ids: list[str], round_: int) -> list[str]:
    """Exactly 2 of `new_ids` were created and the tenant has LIMIT tasks; returns the created ids."""
    assert not [o for o in outcomes.values() if o.startswith("error")], outcomes
    created = [t for t in new_ids if outcomes[t] == "created"]
    assert len(created) == 2, (
        f"round {round_}: {len(created)} of {len(new_ids)} creates succeeded: {outcomes}"
    )
    listed = {info.task_id for info in store.list_tasks(TENANT, limit=1000).items}
    assert len(listed) == LIMIT == store.count_tasks(TENANT), f"round {round_}: {sorted(listed)}"
    assert listed & set(new_ids) == set(created)  # a refused create left no task behind
    return created


@pytest.mark.parametrize("instances", [1, 2], ids=["one-instance", "two-instances"])
def test_concurrent_creates_stop_at_the_limit(store_spec: Any, make_artifact: Make, instances: int) -> None:
    """Threads sharing one store instance (one server), or split over two (two replicas on one
    store). Four more threads add versions to live tasks in the same race: never refused."""
    stores = [store_spec.open() for _ in range(instances)]
    try:
        old = fill(stores[0], make_artifact, LIMIT - 2)
        for round_ in range(ROUNDS):
            new_ids = [f"r{round_}-new-{i}" for i in range(RACERS)]
            versions = old[:4]
            outcomes = race_threads(stores, make_artifact, new_ids, versions)
            assert all(outcomes[t] == "created" for t in versions), outcomes  # new versions: never refused
            created = check_round(stores[-1], outcomes, new_ids, round_)
            for task_id in created:  # back to LIMIT - 2 for the next round (tombstones do not count)
                stores[0].delete(TENANT, task_id)
    finally:
        for s in stores:
            s.close()


CHILD = r"""
import json, os, time
from prompt_store.base import TaskLimitReached
from prompt_store.url import open_store

a = ARGS
store = open_store(a["url"], **a["options"])
data = open(a["blob"], "rb").read()
store.count_tasks(a["tenant"])  # warm up (connections, imports) before the start line
open(a["ready"], "w").close()
while not os.path.exists(a["go"]):
    time.sleep(0.0005)
try:
    store.put(a["tenant"], a["task"], data, max_tasks=a["limit"])
    outcome = "created"
except TaskLimitReached:
    outcome = "refused"
with open(a["out"], "w") as f:
    json.dump(outcome, f)
"""


@pytest.mark.slow
def test_processes_share_the_limit(
    store_spec: Any, make_artifact: Make, fork_server: Any, tmp_path: Path
) -> None:
    """RACERS processes, each with its own store instance on the same directory / bucket (several
    API-server processes on one host, or replicas)."""
    store = store_spec.open()
    fill(store, make_artifact, LIMIT - 2)
    for round_ in range(3):
        work = tmp_path / f"round-{round_}"
        work.mkdir()
        go = work / "go"
        children = []
        new_ids = [f"r{round_}-new-{i}" for i in range(RACERS)]
        for i, task_id in enumerate(new_ids):
            blob = work / f"{task_id}.safetensors"
            blob.write_bytes(make_artifact(1000 * round_ + i))
            args = {"url": store_spec.url, "options": store_spec.options, "blob": str(blob), "tenant": TENANT,
                    "task": task_id, "limit": LIMIT, "ready": str(work / f"{i}.ready"), "go": str(go),
                    "out": str(work / f"{i}.json")}  # fmt: skip
            children.append((fork_server.spawn(CHILD, args, work / f"{i}.log"), i))
        deadline = time.monotonic() + 60
        while not all((work / f"{i}.ready").exists() for i in range(RACERS)):
            assert time.monotonic() < deadline, "children did not start"
            time.sleep(0.005)
        go.touch()
        outcomes = {}
        for pid, i in children:
            status = fork_server.wait(pid)
            assert status == (None, 0), (work / f"{i}.log").read_text()
            outcomes[new_ids[i]] = json.loads((work / f"{i}.json").read_text())
        for task_id in check_round(store, outcomes, new_ids, round_):
            store.delete(TENANT, task_id)
    store.close()


def test_limit_counts_live_tasks_only(store_spec: Any, store: PromptStore, make_artifact: Make) -> None:
    """New versions never count; a deleted task frees its place; re-creating it is a create."""
    old = fill(store, make_artifact, 3)
    # At the limit: a new version of a live task is accepted, a new task is not.
    assert store.put(TENANT, old[0], make_artifact(10), max_tasks=3).version == 2
    with pytest.raises(TaskLimitReached, match="maximum of 3 tasks"):
        store.put(TENANT, "new", make_artifact(11), max_tasks=3)
    assert store_spec.raw_names(TENANT, "new") == set()  # nothing written for the refused task
    store.delete(TENANT, old[1])
    with pytest.raises(TaskLimitReached):  # without a limit it could be created; with 2 it cannot
        store.put(TENANT, "new", make_artifact(12), max_tasks=2)
    assert store.put(TENANT, old[1], make_artifact(13), max_tasks=3).version == 2  # re-created
    with pytest.raises(TaskLimitReached):
        store.put(TENANT, "new", make_artifact(14), max_tasks=3)
    # Other tenants have their own count.
    assert store.put("other", "new", make_artifact(15), max_tasks=1).version == 1
    assert store.count_tasks(TENANT) == 3 and store.count_tasks("other") == 1
    assert store.tenants() == ["lim", "other"]  # the lock files are not tasks or tenants
    assert store.sweep() == 0
    with pytest.raises(ValueError, match="max_tasks"):
        store.put(TENANT, "x", make_artifact(16), max_tasks=-1)


# ------------------------------------------------------------------------------------ S3 lease lock
S3_ONLY = pytest.mark.parametrize("store_spec", ["s3"], indirect=True)
LOCK_KEY = f"store/tenants/{TENANT}/.create-lock"


def plant_lock(store_spec: Any, token: str = "someone-else") -> None:
    """A held lock object as a writer that then died would leave it."""
    client = store_spec_client(store_spec)
    client.put_object(Bucket=store_spec.bucket, Key=LOCK_KEY, Body=json.dumps({"token": token}).encode(),
                      Metadata={"state": "held", "token": token})  # fmt: skip


def store_spec_client(store_spec: Any) -> Any:
    import boto3

    return boto3.client(
        "s3", endpoint_url=store_spec.endpoint, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )  # fmt: skip


def lock_state(store_spec: Any) -> str:
    head = store_spec_client(store_spec).head_object(Bucket=store_spec.bucket, Key=LOCK_KEY)
    return head["Metadata"]["state"]


@S3_ONLY
def test_s3_lock_of_a_dead_holder_expires(store_spec: Any, make_artifact: Make) -> None:
    """A held lock blocks creates (Conflict after lock_timeout) until it is older than lock_ttl; then
    the next create takes it over. New versions of live tasks never wait for it."""
    short = {"connect_timeout": 0.5, "read_timeout": 0.5, "max_attempts": 1}
    store = store_spec.open(lock_ttl=3.0, lock_timeout=0.5, **short)
    store.put(TENANT, "live", make_artifact(1))
    plant_lock(store_spec)
    planted = time.monotonic()
    with pytest.raises(Conflict, match="waiting for the lock"):
        store.put(TENANT, "new", make_artifact(2), max_tasks=5)
    assert store.put(TENANT, "live", make_artifact(3), max_tasks=5).version == 2  # no lock needed

    patient = store_spec.open(lock_ttl=3.0, lock_timeout=20.0, **short)
    assert patient.put(TENANT, "new", make_artifact(4), max_tasks=5).version == 1
    waited = time.monotonic() - planted
    assert 2.5 <= waited < 15.0, waited  # not before the ttl (server clock: + up to 2 s of rounding)
    assert lock_state(store_spec) == "free"  # released after the create
    assert patient.put(TENANT, "newer", make_artifact(5), max_tasks=5).version == 1  # no wait now
    store.close()
    patient.close()


@S3_ONLY
def test_s3_lost_response_to_lock_write_is_recognised(store_spec: Any, make_artifact: Make) -> None:
    """botocore resends a lock write that had succeeded; the 412 it gets is our own lock, recognised
    by its token (else the writer would wait for itself until lock_timeout)."""
    store = store_spec.open(lock_timeout=2.0)
    replays: list[str] = []

    def needs_retry(response: Any, request_dict: dict[str, Any], **_: Any) -> int | None:
        ok = response is not None and response[0].status_code == 200
        if ok and request_dict.get("url", "").split("?")[0].endswith("/.create-lock"):
            replays.append(request_dict["url"])
            return 0 if len(replays) <= 2 else None  # resend the acquiring write and the release
        return None

    store._client.meta.events.register_first("needs-retry.s3.PutObject", needs_retry)
    assert store.put(TENANT, "a", make_artifact(1), max_tasks=5).version == 1
    assert store.put(TENANT, "b", make_artifact(2), max_tasks=5).version == 1  # the release landed
    assert len(replays) >= 3
    assert lock_state(store_spec) == "free"
    store.close()


@S3_ONLY
def test_s3_lock_ttl_must_outlast_one_call(store_spec: Any) -> None:
    with pytest.raises(ValueError, match="lock_ttl"):
        store_spec.open(lock_ttl=10.0, connect_timeout=2.0, read_timeout=5.0, max_attempts=3)
    slow = store_spec.open(read_timeout=60.0)
    assert slow.lock_ttl > 2 * 3 * 60  # the default grows with the timeouts
    slow.close()


# Expiry has two sources (s3_lock.py): the server's clock (Date - Last-Modified) and how long this store
# instance has watched the same version of the lock held. Each is tested alone below.
def test_lock_expiry_decision() -> None:
    """Either source alone expires a lease; the server's age gets one second of slack (whole-second
    HTTP dates), the watch none (a monotonic clock)."""
    assert not expired(None, 2.9, ttl=3.0)
    assert expired(None, 3.1, ttl=3.0)  # no Date from the server: the watch decides
    assert not expired(4.0, 0.0, ttl=3.0)  # within the clock's resolution of the ttl
    assert expired(5.0, 0.0, ttl=3.0)  # never watched before: the server's age decides
    sightings = Sightings()
    assert sightings.watched("k", "e1", "t1", now=100.0) == 0.0
    assert sightings.watched("k", "e1", "t1", now=130.0) == 30.0  # a later acquire: the watch goes on
    assert sightings.watched("k", "e2", "t2", now=131.0) == 0.0  # a new holder starts it again
    sightings.forget("k")
    assert len(sightings) == 0 and sightings.watched("k", "e2", "t2", now=140.0) == 0.0


@S3_ONLY
def test_s3_lock_expires_on_the_server_clock(store_spec: Any, make_artifact: Make) -> None:
    """With lock_timeout < lock_ttl (as with the defaults, 30 s < 60 s) no acquire watches a lock for
    a ttl: a dead holder's lease is expired by its age on the server's clock. Each attempt here is a
    fresh store instance that never saw the lock before, so only that age can say it expired."""
    short = {"connect_timeout": 0.5, "read_timeout": 0.5, "max_attempts": 1}
    plant_lock(store_spec)
    planted = time.monotonic()
    early = store_spec.open(lock_ttl=3.0, lock_timeout=1.0, **short)
    with pytest.raises(Conflict, match="waiting for the lock"):  # not before the ttl
        early.put(TENANT, "new", make_artifact(1), max_tasks=5)
    early.close()
    # Date - Last-Modified > ttl + 1 s is sure once 6 s have passed (whole seconds on both).
    time.sleep(max(0.0, planted + 6.2 - time.monotonic()))
    late = store_spec.open(lock_ttl=3.0, lock_timeout=1.0, **short)
    assert late.put(TENANT, "new", make_artifact(2), max_tasks=5).version == 1
    assert lock_state(store_spec) == "free"
    late.close()


def strip_date(store: PromptStore) -> None:
    """Drop the Date header from the store's HEAD responses, as a gateway in front of S3 might."""

    def before_parse(response_dict: dict[str, Any], **_: Any) -> None:
        response_dict["headers"].pop("date", None)

    store._client.meta.events.register("before-parse.s3.HeadObject", before_parse)  # type: ignore[attr-defined]


@S3_ONLY
def test_s3_lock_expires_by_watching_without_a_server_date(store_spec: Any, make_artifact: Make) -> None:
    """Without Date the server's age is unknown: repeated creates on one store instance, each giving
    up after lock_timeout < lock_ttl, take the lock over once the instance has seen it held, unchanged,
    for the ttl (the watch carries over from one acquire to the next)."""
    short = {"connect_timeout": 0.5, "read_timeout": 0.5, "max_attempts": 1}
    store = store_spec.open(lock_ttl=3.0, lock_timeout=0.5, **short)
    strip_date(store)
    plant_lock(store_spec)
    head = store._client.head_object(Bucket=store_spec.bucket, Key=LOCK_KEY)  # type: ignore[attr-defined]
    assert "date" not in head["ResponseMetadata"]["HTTPHeaders"]  # so no server age
    first_try = time.monotonic()
    attempts = 0
    while True:
        attempts += 1
        try:
            assert store.put(TENANT, "new", make_artifact(1), max_tasks=5).version == 1
            break
        except Conflict:
            assert time.monotonic() - first_try < 15.0, f"not taken over after {attempts} attempts"
            time.sleep(0.3)  # a request now and then, as uploads would come
    took = time.monotonic() - first_try
    assert 3.0 <= took < 6.0 and attempts > 3, (took, attempts)
    assert lock_state(store_spec) == "free"
    store.close()


def count_gets(store: PromptStore, keys: list[str], delay: float = 0.0) -> None:
    """Append the key of every GetObject of the store's to `keys`; sleep `delay` before each."""

    def before_call(params: dict[str, Any], **_: Any) -> None:
        keys.append(params["url_path"])
        time.sleep(delay)

    store._client.meta.events.register("before-call.s3.GetObject", before_call)  # type: ignore[attr-defined]


@S3_ONLY
def test_count_under_the_lease_reads_only_what_it_needs(store_spec: Any, make_artifact: Make) -> None:
    """A refused create at a limit of 2 reads a few manifests, not one per task of the tenant."""
    store = store_spec.open()
    fill(store, make_artifact, 30)
    gets: list[str] = []
    count_gets(store, gets)
    with pytest.raises(TaskLimitReached):
        store.put(TENANT, "new", make_artifact(99), max_tasks=2)
    manifests = [k for k in gets if k.endswith("/manifest.json")]
    assert 2 <= len(manifests) <= 10, len(manifests)  # its own, then one batch (8) of the count
    gets.clear()
    assert store.count_tasks(TENANT, stop_at=20) >= 20 and len(gets) <= 20 + 8
    assert store.count_tasks(TENANT) == 30
    store.close()


@S3_ONLY
def test_a_count_that_outlasts_the_lease_stops_and_says_so(store_spec: Any, make_artifact: Make) -> None:
    """Counting stops once the lease may have run out (not after reading every manifest), nothing is
    committed, and the error is StoreUnavailable naming the cause: a store too slow for the create,
    not a writer in the way (Conflict, which clients retry at once)."""
    short = {"connect_timeout": 0.5, "read_timeout": 0.5, "max_attempts": 1}  # longest call 1 s
    store = store_spec.open(lock_ttl=2.0, **short)  # so the holder may use 1 s
    fill(store, make_artifact, 40)
    gets: list[str] = []
    count_gets(store, gets, delay=0.3)  # each round of 8 parallel reads: 0.3 s
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="counting the tenant's tasks") as caught:
        store.put(TENANT, "new", make_artifact(99), max_tasks=100)
    assert "nothing was committed" in str(caught.value) and "lock_ttl" in str(caught.value)
    assert time.monotonic() - started < 2.5
    assert len([k for k in gets if k.endswith("/manifest.json")]) < 40  # stopped early
    assert store_spec.raw_names(TENANT, "new") == set()
    store.close()


@S3_ONLY
def test_s3_lock_write_that_landed_but_failed_is_freed(store_spec: Any, make_artifact: Make) -> None:
    """The acquiring write reaches S3 but the client sees a failure (here: a read timeout raised after
    the 200): the create fails with StoreUnavailable, and the lock is freed at once instead of
    blocking the tenant's creates for lock_ttl."""
    from botocore.exceptions import ReadTimeoutError

    store = store_spec.open(lock_timeout=0.5)
    state: dict[str, bool] = {"armed": True, "failing": False}

    def before_build(params: dict[str, Any], **_: Any) -> None:
        acquiring = params.get("Key", "").endswith("/.create-lock") and params["Metadata"]["state"] == "held"
        state["failing"] = acquiring and state["armed"]

    def after_call(http_response: Any, **_: Any) -> None:
        if state["failing"] and http_response.status_code == 200:
            state["armed"] = state["failing"] = False
            raise ReadTimeoutError(endpoint_url="the acquiring write")

    store._client.meta.events.register("before-parameter-build.s3.PutObject", before_build)  # type: ignore[attr-defined]
    store._client.meta.events.register("after-call.s3.PutObject", after_call)  # type: ignore[attr-defined]
    with pytest.raises(StoreUnavailable):
        store.put(TENANT, "a", make_artifact(1), max_tasks=5)
    assert not state["armed"]  # the write did land
    assert lock_state(store_spec) == "free"
    other = store_spec.open(lock_timeout=0.5)
    assert other.put(TENANT, "b", make_artifact(2), max_tasks=5).version == 1  # no wait for lock_ttl
    store.close()
    other.close()
