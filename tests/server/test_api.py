"""REST API in-process (FastAPI TestClient with lifespan), tiny random backbone, local store on disk."""

from __future__ import annotations

import base64
import gc
import sys

import pytest
import torch
from fastapi.testclient import TestClient

from prompt_store.artifact import load_artifact, save_artifact
from server.api import schemas
from server.app import create_app
from server.settings import Settings
from tests.server.helpers import BACKBONE_SPEC, artifact_bytes, make_artifact, png_bytes
from vpt.hub import load_backbone
from vpt.prompts import PromptBatch
from vpt.transforms import decode_image, eval_transform


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(BACKBONE_SPEC)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    settings = Settings(
        backbone=BACKBONE_SPEC,
        store=str(tmp_path_factory.mktemp("store")),
        max_prompt_length=16,
        max_classes=20,
        max_images_per_request=8,
        max_body_bytes=2_000_000,
        access_log=False,
        open_mode=True,
    )
    with TestClient(create_app(settings)) as c:
        yield c


def expected_probs(backbone, art_bytes: bytes, image: bytes) -> torch.Tensor:
    """The reference: the task's prompts broadcast as in the paper's code, on the eval transform."""
    a = load_artifact(art_bytes)
    x = backbone.model.normalize(eval_transform(decode_image(image), backbone.cfg)[None])
    with torch.no_grad():
        feats = backbone.model(x, PromptBatch.single_task(a.prompts, 1, deep=a.mode == "deep"))
        return (feats @ a.head_weight.T + a.head_bias).softmax(-1)[0]


def put(client, task: str, data: bytes):
    return client.put(f"/v1/tasks/{task}", content=data, headers={"content-type": "application/octet-stream"})


def assert_error(resp, status: int, type_: str, *words: str) -> None:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["type"] == type_
    for w in words:
        assert w in err["message"], err["message"]


def test_system_endpoints(client, backbone):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    info = client.get("/v1/info").json()
    assert info["backbone"]["fingerprint"] == backbone.fingerprint
    assert info["backbone"]["image_size"] == 32 and info["backbone"]["embed_dim"] == 64
    assert info["limits"]["max_prompt_length"] == 16
    assert client.get("/openapi.json").json()["paths"]["/v1/tasks/{task_id}/classify"]["post"]
    assert client.get("/docs").status_code == 200


def test_openapi_has_examples_that_validate(client):
    """Every JSON body of the /v1 API (request or response) has an example in the OpenAPI document, and
    every example is a valid instance of its model (so the docs cannot drift from the schemas)."""
    spec = client.get("/openapi.json").json()
    components = spec["components"]["schemas"]
    bodies = []
    for path, ops in spec["paths"].items():
        if not path.startswith("/v1/"):
            continue
        for op in ops.values():
            contents = [op.get("requestBody", {}).get("content", {})]
            contents += [r.get("content", {}) for r in op["responses"].values()]
            bodies += [c["application/json"]["schema"] for c in contents if "application/json" in c]
    named = {b["$ref"].rsplit("/", 1)[1] if "$ref" in b else b["title"] for b in bodies}
    assert {"ClassifyJSON", "ClassifyResponse", "EmbedResponse", "TaskOut", "TaskList"} <= named
    assert {"RollbackRequest", "InfoResponse", "ErrorResponse"} <= named
    for name in named:
        examples = components[name].get("examples") if name in components else None
        examples = examples or next((b.get("examples") for b in bodies if b.get("title") == name), None)
        assert examples, f"{name} has no example"
        for ex in examples:
            getattr(schemas, name).model_validate(ex)


def test_upload_classify_all_body_forms(client, backbone):
    data = artifact_bytes(backbone, P=5, mode="deep", C=6, seed=1)
    r = put(client, "birds", data)
    assert r.status_code == 201, r.text
    assert r.json()["version"] == 1 and r.json()["mode"] == "deep" and r.json()["prompt_length"] == 5
    assert put(client, "birds", data).status_code == 200  # new version of an existing task
    imgs = [png_bytes(i) for i in range(3)]
    want = [expected_probs(backbone, data, im) for im in imgs]

    r = client.post(
        "/v1/tasks/birds/classify?top_k=3", files=[("images", (f"{i}.png", im)) for i, im in enumerate(imgs)]
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["task_id"] == "birds" and body["version"] == 2 and len(body["predictions"]) == 3
    for preds, probs in zip(body["predictions"], want, strict=True):
        top = probs.topk(3)
        assert [p["index"] for p in preds] == top.indices.tolist()
        assert [p["label"] for p in preds] == [f"class{i}" for i in top.indices.tolist()]
        assert [p["score"] for p in preds] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert body["timings"]["batch_size"] >= 1

    r = client.post("/v1/tasks/birds/classify", content=imgs[0], headers={"content-type": "image/png"})
    assert r.status_code == 200 and len(r.json()["predictions"][0]) == 5  # default top_k

    b64 = [base64.b64encode(im).decode() for im in imgs[:2]]
    r = client.post("/v1/tasks/birds/classify", json={"images": b64, "top_k": 2})
    assert r.status_code == 200 and [len(p) for p in r.json()["predictions"]] == [2, 2]
    assert r.json()["predictions"][1][0]["index"] == int(want[1].argmax())

    r = client.post("/v1/tasks/birds/embed", files=[("images", ("a.png", imgs[0]))])
    assert r.status_code == 200 and len(r.json()["features"][0]) == 64


def test_task_crud_rollback_and_delete(client, backbone):
    v1 = artifact_bytes(backbone, P=2, mode="shallow", C=3, seed=10)
    v2 = artifact_bytes(backbone, P=3, mode="shallow", C=3, seed=11)
    assert put(client, "crud", v1).status_code == 201
    assert put(client, "crud", v2).status_code == 200
    img = png_bytes(5)
    r = client.post("/v1/tasks/crud/classify", content=img, headers={"content-type": "image/png"})
    assert r.json()["version"] == 2
    assert r.json()["predictions"][0][0]["index"] == int(expected_probs(backbone, v2, img).argmax())

    info = client.get("/v1/tasks/crud").json()
    assert [v["version"] for v in info["versions"]] == [1, 2] and info["usage"]["requests"] == 1
    r = client.post("/v1/tasks/crud/rollback", json={"version": 1})
    assert r.status_code == 200 and r.json()["version"] == 1
    r = client.post("/v1/tasks/crud/classify", content=img, headers={"content-type": "image/png"})
    assert r.json()["version"] == 1
    assert r.json()["predictions"][0][0]["index"] == int(expected_probs(backbone, v1, img).argmax())
    assert_error(client.post("/v1/tasks/crud/rollback", json={"version": 9}), 404, "not_found")

    listed = client.get("/v1/tasks", params={"limit": 1}).json()
    assert len(listed["tasks"]) == 1 and listed["next_cursor"]
    ids = set()
    cursor = None
    while True:
        page = client.get("/v1/tasks", params={"limit": 1, **({"cursor": cursor} if cursor else {})}).json()
        ids |= {t["task_id"] for t in page["tasks"]}
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert "crud" in ids

    assert client.delete("/v1/tasks/crud").status_code == 204
    assert_error(client.get("/v1/tasks/crud"), 404, "not_found")
    r = client.post("/v1/tasks/crud/classify", content=img, headers={"content-type": "image/png"})
    assert_error(r, 404, "not_found")
    assert_error(client.delete("/v1/tasks/crud"), 404, "not_found")


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda bb: make_artifact(bb, P=2, mode="shallow", C=2, seed=0, labels=["a", "b"]), None),
        (lambda bb: make_artifact(bb, P=17, mode="shallow", C=2, seed=0), "prompts"),
        (lambda bb: make_artifact(bb, P=1, mode="shallow", C=21, seed=0), "head.weight"),
    ],
)
def test_upload_validated_against_server_limits(client, backbone, make, field):
    r = put(client, "limits", save_artifact(make(backbone)))
    if field is None:
        assert r.status_code in (200, 201)
    else:
        assert_error(r, 422, "invalid_artifact", field)  # the message names the tensor that is too big


def test_upload_rejects_foreign_backbone_and_garbage(client, backbone):
    a = make_artifact(backbone, P=1, mode="deep", C=2, seed=0)
    a.backbone_fingerprint = "0" * 64
    assert_error(put(client, "foreign", save_artifact(a)), 422, "invalid_artifact", "fingerprint")
    assert_error(put(client, "foreign", b"not a safetensors file"), 422, "invalid_artifact")
    assert_error(client.get("/v1/tasks/foreign"), 404, "not_found")  # nothing was stored


def test_bad_requests_are_4xx_naming_the_problem(client, backbone):
    put(client, "bad", artifact_bytes(backbone, P=1, mode="shallow", C=2, seed=0))
    url = "/v1/tasks/bad/classify"
    assert_error(
        client.post(url, content=b"garbage", headers={"content-type": "image/png"}),
        400,
        "invalid_image",
        "image 0",
    )
    assert_error(
        client.post(url, content=b"x", headers={"content-type": "text/plain"}), 415, "unsupported_media_type"
    )
    assert_error(
        client.post(url, content=b"{", headers={"content-type": "application/json"}),
        400,
        "invalid_request",
        "JSON",
    )
    assert_error(client.post(url, json={"images": ["***"]}), 400, "invalid_request", "base64")
    assert_error(client.post(url, json={"images": []}), 400, "invalid_request", "no images")
    many = [("images", (f"{i}.png", png_bytes(0))) for i in range(9)]
    assert_error(client.post(url, files=many), 400, "invalid_request", "limit")
    big = b"\0" * 2_000_001
    assert_error(
        client.post(url, content=big, headers={"content-type": "image/png"}), 413, "payload_too_large"
    )
    assert_error(
        client.post(url + "?top_k=0", content=png_bytes(0), headers={"content-type": "image/png"}),
        422,
        "invalid_request",
    )
    assert_error(
        client.post("/v1/tasks/UPPER/classify", content=png_bytes(0), headers={"content-type": "image/png"}),
        400,
        "invalid_task_id",
    )
    assert_error(
        client.post("/v1/tasks/nope/classify", content=png_bytes(0), headers={"content-type": "image/png"}),
        404,
        "not_found",
    )
    assert client.get("/readyz").status_code == 200  # still serving


def test_metrics_and_request_ids(client, backbone):
    put(client, "m", artifact_bytes(backbone, P=1, mode="shallow", C=2, seed=0))
    r = client.post(
        "/v1/tasks/m/classify",
        content=png_bytes(0),
        headers={"content-type": "image/png", "x-request-id": "abc-123"},
    )
    assert r.headers["x-request-id"] == "abc-123"
    assert len(client.get("/healthz").headers["x-request-id"]) == 32
    text = client.get("/metrics").text
    for name in (
        "vpt_request_duration_seconds_bucket",
        "vpt_batch_size_bucket",
        "vpt_queue_wait_seconds_count",
        "vpt_batch_compute_seconds_count",
        "vpt_bank_hits_total",
        "vpt_bank_resident_tasks",
        "vpt_bank_bytes",
        "vpt_images_total",
        "vpt_queue_depth_images",
        "vpt_task_load_seconds_count",
    ):
        assert name in text, name
    assert 'route="/v1/tasks/{task_id}/classify"' in text  # template, never the task id
    assert (
        'vpt_tenant_requests_total{route="/v1/tasks/{task_id}/classify",status="200",tenant="default"}'
        in text
    )
    assert 'route="/v1/tasks/m/classify"' not in text


def test_stop_undoes_the_process_wide_start_up_settings(tmp_path):
    """start freezes start-up objects out of the GC and shortens the GIL switch interval (both
    process-wide); stop undoes both, so an in-process app leaves the interpreter as it found it."""
    before = sys.getswitchinterval()
    settings = Settings(
        backbone=BACKBONE_SPEC, store=str(tmp_path / "store"), access_log=False, open_mode=True
    )
    with TestClient(create_app(settings)):
        assert gc.get_freeze_count() > 0
        assert sys.getswitchinterval() == pytest.approx(settings.gil_switch_interval_ms / 1000)
    assert gc.get_freeze_count() == 0
    assert sys.getswitchinterval() == pytest.approx(before, rel=0.02)  # kept in whole µs
