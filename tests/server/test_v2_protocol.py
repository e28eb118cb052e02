"""The Open Inference Protocol (/v2) against a real `vpt-serve` on 127.0.0.1, with tritonclient's HTTP
client: metadata, configuration, readiness, versions, inference with encoded images and raw pixels in
binary and JSON; every result equals /v1's for the same images; bad requests are clear 4xx in the
protocol's error shape; keys, tenants and metrics as on /v1."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import struct
import time
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from server.core.local import LocalCore
from server.errors import Overloaded
from server.preprocess import Pixels
from server.tenants import generate_key
from tests.server.helpers import (
    BACKBONE_SPEC,
    METRICS_AUTH,
    METRICS_TOKEN,
    artifact_bytes,
    png_bytes,
    write_tenants,
)
from tests.server.server_proc import ServerProcess
from tests.server.test_integration import metric
from vpt.hub import load_backbone

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.integration

KEY, OTHER_KEY, TIGHT_KEY = generate_key(), generate_key(), generate_key()
AUTH, OTHER = {"authorization": f"Bearer {KEY}"}, {"authorization": f"Bearer {OTHER_KEY}"}
TIGHT = {"authorization": f"Bearer {TIGHT_KEY}"}  # a tenant of at most 3 queued images


def auth() -> dict[str, str]:
    """A fresh header dict: tritonclient adds its own headers to the one it is given."""
    return dict(AUTH)


def other() -> dict[str, str]:
    return dict(OTHER)


MAX_BODY = 6 * 1024 * 1024  # over the JSON header's own limit (4 MiB)
C = 6  # classes of the test task
SIZES = [(40, 36), (23, 57)]  # images of different sizes, as a client sends them


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(BACKBONE_SPEC)


@pytest.fixture(scope="module")
def server(tmp_path_factory, backbone):
    tmp = tmp_path_factory.mktemp("v2")
    tenants = write_tenants(
        tmp,
        {"acme": KEY, "other": OTHER_KEY, "tight": TIGHT_KEY},
        {"acme": {"rate_per_s": 10000.0}, "tight": {"rate_per_s": 10000.0, "max_queued_images": 3}},
    )
    proc = ServerProcess(
        tmp,
        backbone=BACKBONE_SPEC,
        tenants_file=tenants,
        open_mode="false",
        max_body_bytes=MAX_BODY,
        metrics_token=METRICS_TOKEN,
        access_log="false",
    ).wait_ready()
    for task, seed in (("birds", 1), ("cars", 2)):
        r = httpx.put(
            f"{proc.url}/v1/tasks/{task}",
            content=artifact_bytes(backbone, P=3, mode="deep", C=C, seed=seed),
            headers={**AUTH, "content-type": "application/octet-stream"},
        )
        assert r.status_code == 201, r.text
    r = httpx.put(
        f"{proc.url}/v1/tasks/private",
        content=artifact_bytes(backbone, P=2, mode="shallow", C=3, seed=3),
        headers={**OTHER, "content-type": "application/octet-stream"},
    )
    assert r.status_code == 201, r.text
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def client(server):
    c = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    yield c
    c.close()


def pixels(seed: int, size: tuple[int, int]) -> np.ndarray:
    """The RGB pixels `png_bytes(seed, size)` encodes: (H, W, 3) uint8."""
    return np.asarray(Image.open(io.BytesIO(png_bytes(seed, size))).convert("RGB"))


def v1(server, task: str, image: bytes, route: str = "classify") -> dict:
    r = httpx.post(
        f"{server.url}/v1/tasks/{task}/{route}?top_k={C}"
        if route == "classify"
        else f"{server.url}/v1/tasks/{task}/{route}",
        content=image,
        headers={**AUTH, "content-type": "image/png"},
    )
    assert r.status_code == 200, r.text
    return r.json()


def v1_scores(server, task: str, image: bytes) -> np.ndarray:
    """Softmax over all classes in class order, from /v1 classify."""
    out = np.zeros(C, dtype=np.float64)
    for p in v1(server, task, image)["predictions"][0]:
        out[p["index"]] = p["score"]
    return out


def images_input(blobs: list[bytes], binary: bool = True):
    t = httpclient.InferInput("images", [len(blobs)], "BYTES")
    if binary:
        t.set_data_from_numpy(np.array(blobs, dtype=np.object_), binary_data=True)
    else:  # JSON carries images as base64 text
        t.set_data_from_numpy(
            np.array([base64.b64encode(b).decode() for b in blobs], dtype=np.object_), False
        )
    return t


def pixels_input(arr: np.ndarray, binary: bool = True):
    t = httpclient.InferInput("pixels", list(arr.shape), "UINT8")
    t.set_data_from_numpy(arr, binary_data=binary)
    return t


def error_of(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


# --- server and models ----------------------------------------------------------------------------


def test_server_metadata_and_health(server, client):
    meta = client.get_server_metadata(headers=auth())
    assert meta["name"] == "vpt-serve" and "binary_tensor_data" in meta["extensions"]
    assert client.is_server_live() and client.is_server_ready()  # public, like /healthz
    r = httpx.get(f"{server.url}/v2")  # metadata needs a key
    assert r.status_code == 401 and isinstance(r.json()["error"], str)


def test_model_metadata_config_and_readiness(client, backbone):
    meta = client.get_model_metadata("birds", headers=auth())
    assert meta["name"] == "birds" and meta["versions"] == ["1"] and meta["platform"] == "vpt"
    assert {i["name"]: (i["datatype"], i["shape"]) for i in meta["inputs"]} == {
        "images": ("BYTES", [-1]),
        "pixels": ("UINT8", [-1, -1, -1, 3]),
    }
    outputs = {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]}
    assert outputs["scores"] == ("FP32", [-1, C])
    assert outputs["embedding"] == ("FP32", [-1, backbone.cfg.embed_dim])
    assert outputs["top_indices"][0] == "INT64" and outputs["top_labels"][0] == "BYTES"
    config = client.get_model_config("birds", headers=auth())
    assert config["max_batch_size"] > 0
    assert {i["name"]: i["data_type"] for i in config["input"]} == {
        "images": "TYPE_STRING",
        "pixels": "TYPE_UINT8",
    }
    assert {o["name"]: o["dims"] for o in config["output"]}["scores"] == [C]
    assert client.is_model_ready("birds", headers=auth())
    assert client.is_model_ready("birds", "1", headers=auth())
    assert not client.is_model_ready("birds", "2", headers=auth())
    assert not client.is_model_ready("nope", headers=auth())


# --- inference: every result equals /v1's ---------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False])
def test_encoded_images_equal_v1(server, client, binary):
    blobs = [png_bytes(10 + i, size) for i, size in enumerate(SIZES)]
    result = client.infer("birds", [images_input(blobs, binary)], headers=auth(), parameters={"top_k": 3})
    assert result.get_response()["model_version"] == "1"
    scores = result.as_numpy("scores")
    assert scores.dtype == np.float32 and scores.shape == (2, C)
    for i, blob in enumerate(blobs):
        np.testing.assert_allclose(scores[i], v1_scores(server, "birds", blob), rtol=0, atol=1e-6)
        ref = v1(server, "birds", blob)["predictions"][0][:3]
        assert result.as_numpy("top_indices")[i].tolist() == [p["index"] for p in ref]
        labels = [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy("top_labels")[i]]
        assert labels == [p["label"] for p in ref]
        np.testing.assert_allclose(result.as_numpy("top_scores")[i], [p["score"] for p in ref], atol=1e-6)
        feats = v1(server, "birds", blob, "embed")["features"][0]
        np.testing.assert_allclose(result.as_numpy("embedding")[i], feats, rtol=0, atol=1e-6)


@pytest.mark.parametrize("binary", [True, False])
def test_raw_pixels_equal_v1_on_the_same_pixels(server, client, binary):
    arr = pixels(20, (40, 36))[None]  # (1, H, W, 3)
    out = [httpclient.InferRequestedOutput("scores", binary_data=binary)]
    result = client.infer("cars", [pixels_input(arr, binary)], outputs=out, headers=auth())
    assert result.as_numpy("embedding") is None  # only what was asked for
    expected = v1_scores(server, "cars", png_bytes(20, (40, 36)))
    np.testing.assert_allclose(result.as_numpy("scores")[0], expected, rtol=0, atol=1e-6)


def test_selected_outputs_in_json_and_binary(client):
    outs = [
        httpclient.InferRequestedOutput("top_labels", binary_data=False),
        httpclient.InferRequestedOutput("embedding", binary_data=True),
    ]
    result = client.infer("birds", [images_input([png_bytes(5)])], outputs=outs, headers=auth())
    names = [o["name"] for o in result.get_response()["outputs"]]
    assert names == ["top_labels", "embedding"]
    assert result.as_numpy("top_labels").shape == (1, 5)  # the default top_k, as /v1
    assert result.as_numpy("scores") is None


def test_versions(server, client, backbone):
    img = png_bytes(7)
    r = client.infer("birds", [images_input([img])], model_version="1", headers=auth())
    assert r.get_response()["model_version"] == "1"
    e = error_of(lambda: client.infer("birds", [images_input([img])], model_version="9", headers=auth()))
    assert e.status() == "404" and "current version" in e.message()
    # A new version becomes the only one served.
    httpx.put(
        f"{server.url}/v1/tasks/cars",
        content=artifact_bytes(backbone, P=3, mode="deep", C=C, seed=42),
        headers={**AUTH, "content-type": "application/octet-stream"},
    ).raise_for_status()
    assert client.get_model_metadata("cars", headers=auth())["versions"] == ["2"]
    assert client.get_model_metadata("cars", "2", headers=auth())["name"] == "cars"
    e = error_of(lambda: client.get_model_metadata("cars", "1", headers=auth()))
    assert e.status() == "404"
    r = client.infer("cars", [images_input([img])], headers=auth())
    assert r.get_response()["model_version"] == "2"
    np.testing.assert_allclose(r.as_numpy("scores")[0], v1_scores(server, "cars", img), rtol=0, atol=1e-6)


# --- refusals -------------------------------------------------------------------------------------


def test_bad_inputs_are_clear_400s(client):
    wrong_type = httpclient.InferInput("pixels", [1, 4, 4, 3], "FP32")
    wrong_type.set_data_from_numpy(np.zeros((1, 4, 4, 3), np.float32))
    wrong_shape = pixels_input(np.zeros((1, 4, 4), np.uint8))
    unknown = httpclient.InferInput("image", [1], "BYTES")
    unknown.set_data_from_numpy(np.array([b"x"], dtype=np.object_))
    not_an_image = images_input([b"not an image"])
    cases = [
        ([wrong_type], "must be UINT8"),
        ([wrong_shape], "[N, H, W, 3]"),
        ([unknown], "unknown input 'image'"),
        ([images_input([png_bytes(1)]), pixels_input(pixels(1, (40, 36))[None])], "exactly one input"),
        ([not_an_image], "image 0"),
    ]
    for inputs, words in cases:
        e = error_of(lambda inputs=inputs: client.infer("birds", inputs, headers=auth()))
        assert e.status() == "400" and words in e.message(), (words, e.message())
    out = [httpclient.InferRequestedOutput("logits")]
    e = error_of(lambda: client.infer("birds", [images_input([png_bytes(1)])], outputs=out, headers=auth()))
    assert e.status() == "400" and "unknown output 'logits'" in e.message()
    e = error_of(
        lambda: client.infer("birds", [images_input([png_bytes(1)])], parameters={"top_k": 0}, headers=auth())
    )
    assert e.status() == "400" and "top_k" in e.message()


def test_oversized_binary_section_is_413(server):
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "pixels",
                    "datatype": "UINT8",
                    "shape": [1, 1500, 1500, 3],
                    "parameters": {"binary_data_size": 1500 * 1500 * 3},
                }
            ]
        }
    ).encode()
    r = httpx.post(
        f"{server.url}/v2/models/birds/infer",
        content=head + bytes(1500 * 1500 * 3),
        headers={**AUTH, "inference-header-content-length": str(len(head))},
    )
    assert r.status_code == 413 and "exceeds the limit" in r.json()["error"], r.text


def v2_input(name: str, datatype: str, shape: object, data: str) -> bytes:
    return f'{{"inputs": [{{"name": "{name}", "datatype": "{datatype}", "shape": {shape}, "data": {data}}}]}}'.encode()


def test_sizes_and_values_a_client_chooses_are_refused_quickly_as_4xx(server):
    """Checked on the declared header before any data is decoded, each answered at once (a generous
    bound for a busy CI box: each of these once took seconds on the event loop, or was a 500)."""
    many = b"".join(struct.pack("<I", 2) + b"ab" for _ in range(200_000))  # 200k tiny "images"
    many_head = json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "datatype": "BYTES",
                    "shape": [200_000],
                    "parameters": {"binary_data_size": len(many)},
                }
            ]
        }
    ).encode()
    cases = [
        # (body, Inference-Header-Content-Length, status, words)
        (v2_input("pixels", "UINT8", [1] * 4 + [10**18] * 40_000, "[0]"), None, 400, "at most 8"),
        (v2_input("pixels", "UINT8", [10**2000] * 4, "[0]"), None, 400, "int64"),
        (
            v2_input("pixels", "UINT8", [1, 1, 1, 3], "[" + ",".join(["[0]"] * 1_000_000) + "]"),
            None,
            400,
            "widely",
        ),
        (
            v2_input("pixels", "UINT8", [1, 1, 1, 3], "[" + ",".join(["0"] * 2_500_000) + "]"),
            None,
            413,
            "JSON part",
        ),
        (many_head + many, str(len(many_head)), 400, "200000 images: a request carries 1 to"),
        (v2_input("pixels", "UINT8", [1, 10**6, 10**6, 3], "[0]"), None, 400, "can hold"),
        (v2_input("pixels", "FP32", [1, 1, 1, 3], f"[{10**400}, 0, 0]"), None, 400, "must be UINT8"),
        (v2_input("images", "BYTES", [1], '["\\ud800"]'), None, 400, "valid Unicode"),
    ]
    for body, header_length, status, words in cases:
        headers = {**AUTH, "content-type": "application/json"}
        if header_length is not None:
            headers["inference-header-content-length"] = header_length
        t0 = time.perf_counter()
        r = httpx.post(f"{server.url}/v2/models/birds/infer", content=body, headers=headers, timeout=30)
        elapsed = time.perf_counter() - t0
        assert r.status_code == status and words in r.json()["error"], (words, r.status_code, r.text[:300])
        assert r.json() == {"error": r.json()["error"]} and len(r.json()["error"]) < 300
        assert elapsed < 2.0, (words, elapsed)


def test_a_tenants_queue_bound_counts_every_output_at_admission(server):
    """Classify and embed each queue the images: a tenant of 3 queued images is served 1 image with
    every output (2 queued), and refused 2 with every output (4) before they are decoded, rather than
    after the first submission ran."""
    tight = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    upload = httpx.put(
        f"{server.url}/v1/tasks/birds",
        content=artifact_bytes(load_backbone(BACKBONE_SPEC), P=2, mode="deep", C=C, seed=5),
        headers={**TIGHT, "content-type": "application/octet-stream"},
    )
    assert upload.status_code == 201, upload.text
    result = tight.infer("birds", [images_input([png_bytes(1)])], headers=dict(TIGHT))
    assert result.as_numpy("scores").shape == (1, C) and result.as_numpy("embedding").shape[0] == 1

    def decoded() -> float:
        return metric(
            httpx.get(f"{server.url}/metrics", headers=METRICS_AUTH).text, "vpt_images_decoded_total"
        )

    before = decoded()
    e = error_of(
        lambda: tight.infer("birds", [images_input([png_bytes(1), png_bytes(2)])], headers=dict(TIGHT))
    )
    assert e.status() == "429" and "limit 3" in e.message()
    assert decoded() == before  # refused before decoding
    out = [httpclient.InferRequestedOutput("scores")]  # one output: 2 images fit
    result = tight.infer(
        "birds", [images_input([png_bytes(1), png_bytes(2)])], outputs=out, headers=dict(TIGHT)
    )
    assert result.as_numpy("scores").shape == (2, C)
    tight.close()


def test_a_failed_output_cancels_the_other():
    """When one output's submission fails, the other's is cancelled (its queued images freed, no
    engine work left running) before the error goes on, admission held room for both, and the task's
    usage counts the request once, as failed (`LocalCore.run`, which /v1 and /v2 requests go through)."""

    class Scheduler:
        def __init__(self) -> None:
            self.admitted: list[int] = []
            self.queued = 0  # classify's images waiting
            self.cancelled = False
            self.residency = SimpleNamespace(knows=lambda tenant, task_id: True)

        @contextlib.contextmanager
        def admit(self, tenant, n, max_queued):
            self.admitted.append(n)
            yield

        async def submit(self, tenant, task_id, pixels, *, output, **_):
            if output == "embed":
                await asyncio.sleep(0)  # classify is queued by now
                raise Overloaded("the server queue is full")
            self.queued += len(pixels)
            try:
                await asyncio.Event().wait()  # never computed
            except asyncio.CancelledError:
                self.cancelled = True
                raise
            finally:
                self.queued -= len(pixels)

    backbone = load_backbone(BACKBONE_SPEC)
    engine = SimpleNamespace(backbone=backbone, cfg=backbone.cfg, device="cpu", dtype="torch.float32")
    scheduler = Scheduler()
    core = LocalCore(engine, scheduler)  # type: ignore[arg-type]

    async def main() -> None:
        admission = await core.admit("t", 4, None)  # 2 images, 2 outputs
        with pytest.raises(Overloaded):
            await core.run(
                admission,
                "birds",
                Pixels(torch.zeros(2, 3, 8, 8)),
                ("classify", "embed"),
                top_k=5,
                timeout_s=5,
                weight=1,
            )
        assert scheduler.cancelled and scheduler.queued == 0

    asyncio.run(main())
    assert scheduler.admitted == [4]
    usage = core.task_stats.get("t", "birds")
    assert (usage.requests, usage.errors, usage.images) == (1, 1, 0)


def test_unknown_and_other_tenants_models_are_the_same_404(client):
    for model in ("nope", "private"):  # "private" is another tenant's task
        e = error_of(lambda model=model: client.infer(model, [images_input([png_bytes(1)])], headers=auth()))
        assert e.status() == "404", e.message()
        e = error_of(lambda model=model: client.get_model_metadata(model, headers=auth()))
        assert e.status() == "404"
    # Its owner sees it.
    assert client.get_model_metadata("private", headers=other())["name"] == "private"


def test_keys_are_checked_before_the_body_and_errors_keep_their_shapes(server, client):
    e = error_of(lambda: client.infer("birds", [images_input([png_bytes(1)])]))
    assert e.status() == "401" and "API key" in e.message()
    r = httpx.post(f"{server.url}/v2/models/birds/infer", content=b"{", headers=auth())
    assert r.status_code == 400 and r.json() == {"error": r.json()["error"]}
    assert isinstance(r.json()["error"], str)
    r = httpx.post(
        f"{server.url}/v1/tasks/nope/classify",
        content=png_bytes(1),
        headers={**AUTH, "content-type": "image/png"},
    )
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"  # /v1 keeps its shape


def test_metrics_and_task_stats_count_v2_requests(server, client):
    def usage() -> dict:
        return httpx.get(f"{server.url}/v1/tasks/birds", headers=auth()).json()["usage"]

    before_usage = usage()
    before = httpx.get(f"{server.url}/metrics", headers=METRICS_AUTH).text
    client.infer("birds", [images_input([png_bytes(1), png_bytes(2)])], headers=auth())
    after = httpx.get(f"{server.url}/metrics", headers=METRICS_AUTH).text
    after_usage = usage()
    assert (
        metric(after, "vpt_images_total", route="v2_infer")
        - metric(before, "vpt_images_total", route="v2_infer")
        == 2
    )
    route = "/v2/models/{task_id}/infer"
    count = "vpt_request_duration_seconds_count"
    assert (
        metric(after, count, route=route, status="200") - metric(before, count, route=route, status="200")
        == 1
    )
    assert after_usage["requests"] - before_usage["requests"] == 1
    assert after_usage["images"] - before_usage["images"] == 2
