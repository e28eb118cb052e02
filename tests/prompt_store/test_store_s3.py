"""S3-backend specifics: failing fast when the endpoint is unreachable, missing buckets, and the
conditional-write protocol surviving a lost response (botocore retries a request that had succeeded)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from prompt_store.base import StoreUnavailable
from prompt_store.s3 import S3Store

Make = Callable[..., bytes]
CREDS = {"region": "us-east-1", "access_key_id": "testing", "secret_access_key": "testing"}


def closed_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def black_hole() -> Iterator[str]:
    """An endpoint that accepts TCP connections and never answers (a hung proxy or server)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                held.append(conn)
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


def all_operations(store: S3Store, data: bytes) -> list[Callable[[], object]]:
    return [
        store.ping,
        lambda: store.put("acme", "cats", data),
        lambda: store.get("acme", "cats"),
        lambda: store.info("acme", "cats"),
        lambda: store.current_version("acme", "cats"),
        lambda: store.list_tasks("acme"),
        store.tenants,
        lambda: store.delete("acme", "cats"),
        lambda: store.set_current("acme", "cats", 1),
    ]


def test_refused_endpoint_fails_fast_with_default_settings(make_artifact: Make) -> None:
    store = S3Store("bucket", "p", endpoint_url=f"http://127.0.0.1:{closed_port()}", **CREDS)
    for op in all_operations(store, make_artifact(1)):
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as exc:
            op()
        elapsed = time.monotonic() - started
        assert elapsed < 5.0, f"{op} took {elapsed:.1f}s"  # 3 attempts with jittered backoff
        assert "127.0.0.1" in str(exc.value)


def test_silent_endpoint_times_out(black_hole: str, make_artifact: Make) -> None:
    store = S3Store("bucket", "p", endpoint_url=black_hole, read_timeout=0.5, max_attempts=2, **CREDS)
    for op in all_operations(store, make_artifact(1))[:3]:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            op()
        elapsed = time.monotonic() - started
        assert elapsed < 4.0, f"{op} took {elapsed:.1f}s"  # 2 x 0.5 s reads + backoff, not a hang


def test_missing_bucket_is_unavailable(s3_endpoint: str, make_artifact: Make) -> None:
    store = S3Store("no-such-bucket-here", endpoint_url=s3_endpoint, **CREDS)
    with pytest.raises(StoreUnavailable):
        store.ping()
    with pytest.raises(StoreUnavailable) as exc:
        store.put("acme", "cats", make_artifact(1))
    assert "NoSuchBucket" in str(exc.value)


@pytest.fixture
def s3_store(s3_endpoint: str) -> Iterator[S3Store]:
    import uuid

    import boto3

    bucket = f"vpt-{uuid.uuid4().hex[:16]}"
    boto3.client(
        "s3", endpoint_url=s3_endpoint, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    ).create_bucket(Bucket=bucket)  # fmt: skip
    store = S3Store(bucket, "pfx", endpoint_url=s3_endpoint, **CREDS)
    yield store
    store.close()


def replay_once(store: S3Store, key_suffix: str) -> list[str]:
    """Make botocore resend the next successful PutObject whose key ends with `key_suffix`.

    This is what happens when a response is lost on the wire: the write took effect, the client
    retries, and the conditional header now fails (412). The store must not mistake its own
    success for a lost race. Uses botocore's public `needs-retry` event; returns a log of replays.
    """
    replays: list[str] = []

    def needs_retry(response: Any, request_dict: dict[str, Any], attempts: int, **_: Any) -> int | None:
        url = request_dict.get("url", "")
        ok = response is not None and response[0].status_code == 200
        if not replays and ok and url.split("?")[0].endswith(key_suffix):
            replays.append(url)
            return 0  # retry immediately
        return None

    # The store's client is private; the hook is the public botocore extension point.
    store._client.meta.events.register_first("needs-retry.s3.PutObject", needs_retry)
    return replays


def test_lost_response_to_manifest_swap_is_recognised(s3_store: S3Store, make_artifact: Make) -> None:
    s3_store.put("acme", "cats", make_artifact(1))
    replays = replay_once(s3_store, "/manifest.json")
    new = make_artifact(2)
    info = s3_store.put("acme", "cats", new)
    assert replays, "the hook never fired"
    assert info.version == 2
    assert s3_store.get("acme", "cats") == (new, info)  # its own data was not deleted as a "loser"
    assert [v.version for v in s3_store.info("acme", "cats").versions] == [1, 2]
    assert s3_store.sweep() == 0


def test_lost_response_to_version_claim_skips_a_number(s3_store: S3Store, make_artifact: Make) -> None:
    s3_store.put("acme", "cats", make_artifact(1))
    replays = replay_once(s3_store, "/v000002.safetensors")
    new = make_artifact(2)
    info = s3_store.put("acme", "cats", new)
    assert replays
    assert info.version == 3  # v2's key was (by us) already taken: never reuse, skip
    assert s3_store.get("acme", "cats") == (new, info)
    assert s3_store.sweep() == 0  # the orphaned v2 object was deleted by the writer itself


def test_current_version_is_one_head_request(s3_store: S3Store, make_artifact: Make) -> None:
    s3_store.put("acme", "cats", make_artifact(1))
    calls: list[str] = []
    s3_store._client.meta.events.register("before-call.s3", lambda event_name, **_: calls.append(event_name))
    assert s3_store.current_version("acme", "cats") == 1
    assert calls == ["before-call.s3.HeadObject"]
    s3_store.delete("acme", "cats")
    from prompt_store.base import NotFound

    with pytest.raises(NotFound):
        s3_store.current_version("acme", "cats")


def test_lost_response_to_delete_and_rollback_is_recognised(s3_store: S3Store, make_artifact: Make) -> None:
    from prompt_store.base import NotFound

    s3_store.put("acme", "cats", make_artifact(1))
    s3_store.put("acme", "cats", make_artifact(2))
    replays = replay_once(s3_store, "/manifest.json")
    assert s3_store.set_current("acme", "cats", 1).version == 1  # not a Conflict
    assert replays and s3_store.current_version("acme", "cats") == 1
    replays = replay_once(s3_store, "/manifest.json")
    s3_store.delete("acme", "cats")  # not NotFound: the tombstone that "failed" was our own
    assert replays
    with pytest.raises(NotFound):
        s3_store.get("acme", "cats")
    assert s3_store.sweep() == 0
