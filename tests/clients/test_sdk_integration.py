"""The SDK against a real `vpt-serve` (tests/clients/conftest.py): every method, sync and async, and the
error classes built from the server's real replies (401, 403, 404, 400, 422, 429 with Retry-After), and
a kept-alive connection lost as the next request goes out (tests/clients/dropping_proxy.py in front of
the real server): reads are resent once, an upload or a delete never.

The sync and async clients run one shared scenario through `Calls`, so both are held to the same
expectations; predictions are checked against the reference forward pass (tests/server/test_api.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image

from clients import errors
from clients.client import AsyncClient, Client, RetryPolicy
from clients.types import ClassifyResult
from tests.clients.dropping_proxy import DroppingProxy, Seen
from tests.server.helpers import BACKBONE_SPEC, png_bytes
from tests.server.server_proc import free_port
from tests.server.test_api import expected_probs

pytestmark = pytest.mark.integration

NO_RETRY = RetryPolicy(max_retries=0)


class Calls:
    """`calls.info()` runs `client.info()`, awaiting it for an AsyncClient (on one private loop)."""

    def __init__(self, client: Client | AsyncClient, loop: asyncio.AbstractEventLoop | None) -> None:
        self.client, self.loop = client, loop

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.client, name)
        if self.loop is None:
            return method
        return lambda *a, **kw: self.loop.run_until_complete(method(*a, **kw))

    def close(self) -> None:
        if self.loop is None:
            self.client.close()  # type: ignore[union-attr]
        else:
            self.loop.run_until_complete(self.client.close())  # type: ignore[misc]
            self.loop.close()


@pytest.fixture(params=["sync", "async"])
def make(request) -> Iterator[Any]:
    """`make(url, key, **kw)` → Calls over a Client or an AsyncClient (closed after the test)."""
    made: list[Calls] = []

    def factory(url: str, key: str | None, **kw: Any) -> Calls:
        if request.param == "sync":
            calls = Calls(Client(url, key, **kw), None)
        else:
            loop = asyncio.new_event_loop()
            calls = Calls(AsyncClient(url, key, **kw), loop)
        made.append(calls)
        return calls

    factory.mode = request.param  # type: ignore[attr-defined]
    yield factory
    for c in made:
        c.close()


def check_top(result: ClassifyResult, image: int, probs, k: int) -> None:
    top = probs.topk(k)
    preds = result.predictions[image]
    assert [p.index for p in preds] == top.indices.tolist()
    assert [p.score for p in preds] == pytest.approx(top.values.tolist(), abs=1e-5)


def test_every_method_against_a_real_server(live, make, tmp_path):
    c = make(live.url, live.keys["acme"])
    task = f"sdk-{make.mode}"
    labels = ["ant", "bee", "cat", "dog"]
    v1_bytes = live.artifact(seed=1, labels=labels)
    v2_bytes = live.artifact(seed=2, P=3, mode="shallow", labels=labels)
    (tmp_path / "v2.safetensors").write_bytes(v2_bytes)

    assert c.health() is True
    info = c.info()
    assert info.backbone.spec == BACKBONE_SPEC
    assert info.backbone.fingerprint == live.backbone.fingerprint
    assert (info.backbone.image_size, info.backbone.embed_dim) == (32, 64)

    t1 = c.upload(task, v1_bytes)  # bytes
    assert (t1.tenant, t1.task_id, t1.mode, t1.prompt_length, t1.labels) == ("acme", task, "deep", 2, labels)
    assert [v.version for v in t1.versions] == [t1.version]
    t2 = c.upload(task, tmp_path / "v2.safetensors")  # a path: a new version
    assert t2.version > t1.version and (t2.mode, t2.prompt_length) == ("shallow", 3)

    listed = c.tasks()
    assert task in [t.task_id for t in listed.tasks] and listed.next_cursor is None
    shown = c.task(task)
    assert shown.version == t2.version and [v.version for v in shown.versions] == [t1.version, t2.version]
    assert shown.usage is not None

    img = png_bytes(7, size=(48, 40))
    (tmp_path / "img.png").write_bytes(img)
    arr = np.asarray(Image.open(tmp_path / "img.png").convert("RGB"))
    res = c.classify(task, [tmp_path / "img.png", img, Image.fromarray(arr), arr], top_k=3)
    assert (res.task_id, res.version, len(res.predictions)) == (task, t2.version, 4)
    probs = expected_probs(live.backbone, v2_bytes, img)
    for i in range(4):  # path, bytes, PIL and numpy: the same pixels, the same answer
        check_top(res, i, probs, 3)
    assert {p.label for p in res.predictions[0]} <= set(labels)
    assert res.timings.total_ms > 0 and res.timings.batch_size >= 1

    single = c.classify(task, img)  # one image, the server's default top_k (5, capped by C=4)
    assert len(single.predictions) == 1 and len(single.predictions[0]) == 4

    emb = c.embed(task, [img, img])
    assert len(emb.features) == 2 and len(emb.features[0]) == 64
    assert emb.features[0] == pytest.approx(emb.features[1], abs=1e-5)

    back = c.rollback(task, t1.version)
    assert back.version == t1.version
    res1 = c.classify(task, img, top_k=2)
    assert res1.version == t1.version
    check_top(res1, 0, expected_probs(live.backbone, v1_bytes, img), 2)

    assert c.delete(task) is None
    with pytest.raises(errors.NotFound):
        c.task(task)


def test_error_replies_map_to_their_classes(live, make):
    acme = make(live.url, live.keys["acme"], retry=NO_RETRY)
    acme.upload("sdk-errors", live.artifact(seed=3))

    with pytest.raises(errors.NotFound) as e:
        acme.task("no-such-task")
    assert e.value.status == 404 and "no-such-task" in e.value.message
    assert str(e.value).startswith("404 not_found: ")

    with pytest.raises(errors.InvalidArtifact) as e:  # not a safetensors file
        acme.upload("sdk-bad", b"definitely not an artifact")
    assert e.value.status == 422

    with pytest.raises(errors.InvalidImage) as e:
        acme.classify("sdk-errors", b"not an image")
    assert e.value.status == 400 and e.value.message.startswith("image 0")

    with pytest.raises(errors.InvalidTaskId) as e:
        acme.task("Upper-Case")
    assert e.value.status == 400

    with pytest.raises(errors.InvalidRequest) as e:  # top_k over VPT_MAX_TOP_K
        acme.classify("sdk-errors", png_bytes(0), top_k=100_000)
    assert "top_k" in e.value.message  # 400 here; docs/api.md lists 422 for out-of-range parameters

    with pytest.raises(errors.Forbidden) as e:  # ?tenant= is for admins
        acme.tasks(tenant="beta")
    assert e.value.status == 403

    with pytest.raises(errors.Unauthorized) as e:
        make(live.url, "vpt_not-a-real-key", retry=NO_RETRY).tasks()
    assert e.value.status == 401
    with pytest.raises(errors.Unauthorized):
        make(live.url, "", retry=NO_RETRY).info()  # no key at all

    # Another tenant's task answers exactly like a missing one; an admin reaches it with tenant=.
    with pytest.raises(errors.NotFound):
        make(live.url, live.keys["beta"]).task("sdk-errors")
    root = make(live.url, live.keys["root"])
    assert root.task("sdk-errors", tenant="acme").tenant == "acme"
    root.delete("sdk-errors", tenant="acme")

    dead = make(f"http://127.0.0.1:{free_port()}", "k", retry=RetryPolicy(max_retries=1, backoff_s=0.01))
    with pytest.raises(errors.ConnectionFailed):
        dead.info()
    assert dead.health() is False


def test_429_carries_retry_after_and_the_client_waits_it_out(live, make):
    """Tenant `slow` may make 1 request/s (burst 2): the third at once is 429 with Retry-After."""
    impatient = make(live.url, live.keys["slow"], retry=NO_RETRY)
    with pytest.raises(errors.Overloaded) as e:
        for _ in range(4):
            impatient.tasks()
    assert e.value.status == 429 and e.value.retry_after is not None and e.value.retry_after >= 1
    patient = make(live.url, live.keys["slow"], retry=RetryPolicy(max_retries=3, max_backoff_s=3.0))
    assert patient.tasks().tasks == []


@pytest.fixture
def proxy(live) -> Iterator[DroppingProxy]:
    p = DroppingProxy(live.url)
    yield p
    p.close()


@pytest.mark.parametrize("close", ["fin", "rst"])
def test_a_lost_keep_alive_connection_resends_reads_but_never_an_upload_or_delete(
    live, make, proxy, close, caplog
):
    """The connection the client kept alive is closed (or reset) as the next request goes out. Unsent
    (the server never saw it): a read is sent again, once, on a new connection and answered; an
    upload is not (no new version: the caller may upload again). Processed (the server acted, the
    reply was lost): the upload committed exactly once and is not resent; classify is resent and
    answered; delete is not resent (a resend would answer 404). The server's task versions show it."""
    caplog.set_level(logging.INFO, logger="clients.client")
    c = make(proxy.url, live.keys["acme"], retry=RetryPolicy(max_retries=3, backoff_s=0.01))
    task = f"sdk-keepalive-{make.mode}-{close}"
    path = f"/v1/tasks/{task}"

    def versions() -> list[int]:  # a GET on a new connection (the lost one is gone)
        return [v.version for v in c.task(task).versions]

    def sent(method: str, p: str = path) -> list[Seen]:
        return [s for s in proxy.seen if (s.method, s.path) == (method, p)]

    v1 = c.upload(task, live.artifact(seed=11)).version

    proxy.lose_next("unsent", close)
    assert c.task(task).version == v1
    assert [(s.connection, s.lost) for s in sent("GET")] == [(1, "unsent"), (2, None)]  # retried once

    proxy.lose_next("unsent", close)
    with pytest.raises(errors.ConnectionFailed) as e:
        c.upload(task, live.artifact(seed=12))
    assert type(e.value) is errors.ConnectionFailed
    assert [s.lost for s in sent("PUT")] == [None, "unsent"]  # not resent
    assert versions() == [v1]

    proxy.lose_next("processed", close)
    with pytest.raises(errors.ConnectionFailed):
        c.upload(task, live.artifact(seed=13))
    assert [s.lost for s in sent("PUT")] == [None, "unsent", "processed"]
    assert len(versions()) == 2  # the server committed it, once

    proxy.lose_next("processed", close)
    assert len(c.classify(task, png_bytes(1)).predictions) == 1
    assert [s.lost for s in sent("POST", f"{path}/classify")] == ["processed", None]

    proxy.lose_next("processed", close)
    with pytest.raises(errors.ConnectionFailed):
        c.delete(task)
    assert [s.lost for s in sent("DELETE")] == ["processed"]
    with pytest.raises(errors.NotFound):  # deleted by the one DELETE that arrived
        c.task(task)

    retries = [r.getMessage() for r in caplog.records if r.name == "clients.client"]
    assert [r.split(" in ")[0] for r in retries] == [
        f"retry 1 of GET {path}",
        f"retry 1 of POST {path}/classify",
    ]
    assert all(("RemoteProtocolError" if close == "fin" else "ReadError") in r for r in retries)
