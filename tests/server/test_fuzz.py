"""API fuzzing (issue D, point 7): schemathesis against the app's own OpenAPI schema, in process.

Every operation is fuzzed three ways, with a tenant's API key (so the auth, tenant and rate-limit paths
run too):
- positive: schema-valid requests (random ids, queries, bodies);
- negative: schema-violating requests (wrong types, out-of-range values, missing bodies, and — the
  bearer scheme being declared — a missing Authorization header: such cases go without a key);
- real-task: schema-valid requests against a task that exists, so bodies reach the decoder, the
  artifact validator and the scheduler.

Checks on every response: no 5xx, the status code is documented for the operation, the Content-Type
and the body match the documented schema, documented headers are present; negative requests must be
rejected (4xx), and schema-valid requests to operations without opaque bodies must be accepted.

Bounded: `VPT_FUZZ_EXAMPLES` examples per operation and variant (default 40), derandomised so CI runs
the same examples every time (set `VPT_FUZZ_SEED` to explore others). The number of requests sent is
printed at the end of the module.
"""

from __future__ import annotations

import collections
import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, seed, settings
from schemathesis import GenerationMode
from schemathesis import checks as st_checks
from schemathesis.python import asgi as st_asgi

from prompt_store.ids import ID_MAX_LEN, ID_PATTERN
from server.app import create_app
from server.settings import Settings
from server.tenants import generate_key
from tests.server.helpers import BACKBONE_SPEC, artifact_bytes, keyed_settings, png_bytes
from vpt.hub import load_backbone

EXAMPLES = int(os.environ.get("VPT_FUZZ_EXAMPLES", "40"))
SEED = os.environ.get("VPT_FUZZ_SEED")
KEY, ROOT_KEY = generate_key(), generate_key()
AUTH = {"authorization": f"Bearer {KEY}"}
REAL_TASK = "fuzz-task"
OPEN_ROUTES = ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready")
ADMIN_ROUTES = ("/metrics",)  # an admin's key (VPT_METRICS_TOKEN unset)
ID_RULE = "^" + ID_PATTERN.pattern + "$"


def _settings(tmp) -> Settings:
    return keyed_settings(
        tmp,
        {"fuzz": KEY, "root": ROOT_KEY},
        {"fuzz": {"rate_per_s": 100000.0}, "root": {"role": "admin"}},
        max_prompt_length=16,
        max_classes=20,
        max_images_per_request=8,
        max_body_bytes=2_000_000,
        request_timeout_s=5.0,
    )


def _app_schema() -> dict:
    """The schema as the app builds it (building the app loads nothing; the lifespan does)."""
    return create_app(Settings(backbone=BACKBONE_SPEC, store="unused", open_mode=True)).openapi()


LABELS = [f"{m.upper()} {p}" for p, ops in _app_schema()["paths"].items() for m in ops]
REQUESTS: collections.Counter[str] = collections.Counter()


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(BACKBONE_SPEC)


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    """The app with its lifespan run by schemathesis' own ASGI client (one event loop for every call:
    a second client, e.g. Starlette's TestClient, would start a second lifespan on another loop)."""
    app = create_app(_settings(tmp_path_factory.mktemp("fuzz")))
    try:
        with st_asgi.get_client(app) as client:
            yield client, schemathesis.openapi.from_asgi("/openapi.json", app)
    finally:
        st_asgi.shutdown_lifespans()  # drains and stops the server
    total = sum(REQUESTS.values())
    print(f"\nschemathesis: {total} requests over {len(LABELS)} operations: {dict(REQUESTS)}")


def _ensure_real_task(client, backbone) -> None:
    if client.get(f"/v1/tasks/{REAL_TASK}", headers=AUTH).status_code == 404:
        r = client.put(
            f"/v1/tasks/{REAL_TASK}",
            data=artifact_bytes(backbone, P=2, mode="deep", C=3, seed=0),
            headers={**AUTH, "content-type": "application/octet-stream"},
        )
        assert r.status_code == 201, r.text


BASE_CHECKS = [
    st_checks.not_a_server_error,
    st_checks.status_code_conformance,
    st_checks.content_type_conformance,
    st_checks.response_schema_conformance,
    st_checks.response_headers_conformance,
]
# Operations whose bodies are opaque bytes (images, artifacts): the schema cannot say "a decodable
# image", so schema-valid random bytes are rightly refused and positive acceptance is not checked.
# An Open Inference Protocol request is declared as any JSON object (or bytes, with binary tensors).
OPAQUE_BODIES = ("/classify", "/embed", "PUT /v1/tasks/{task_id}", "/infer")


@pytest.mark.parametrize("variant", ["positive", "negative", "real-task"])
@pytest.mark.parametrize("label", LABELS)
def test_fuzz(fuzz, backbone, label, variant):
    client, schema = fuzz
    path = label.split(" ", 1)[1]
    if variant == "negative" and path in OPEN_ROUTES + ADMIN_ROUTES:
        pytest.skip("no parameters or body to violate")
    if variant == "real-task" and "{task_id}" not in path:
        pytest.skip("no task in the path")
    op = schema.find_operation_by_label(label)
    checks = list(BASE_CHECKS)
    if variant == "negative":
        checks.append(st_checks.negative_data_rejection)
    elif not any(o in label for o in OPAQUE_BODIES):
        checks.append(st_checks.positive_data_acceptance)
    kwargs = {}
    if variant == "real-task":
        _ensure_real_task(client, backbone)
        kwargs["path_parameters"] = {"task_id": REAL_TASK}
    mode = GenerationMode.NEGATIVE if variant == "negative" else GenerationMode.POSITIVE
    headers = (
        {}
        if path in OPEN_ROUTES
        else {"authorization": f"Bearer {ROOT_KEY}"}
        if path in ADMIN_ROUTES
        else AUTH
    )

    @given(case=op.as_strategy(generation_mode=mode, **kwargs))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=SEED is None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case):
        REQUESTS[label] += 1
        sent = headers
        if mode is GenerationMode.NEGATIVE and "authorization" not in {k.lower() for k in case.headers or {}}:
            # The declared bearer scheme makes the header required: a negative case may drop it, and
            # then it must be refused (401), not repaired with our key.
            sent = {}
        case.call_and_validate(headers=sent, checks=checks)

    if SEED is not None:
        run = seed(int(SEED))(run)
    run()
    # The server is still fine afterwards.
    assert client.get("/readyz").status_code == 200
    if variant == "real-task":
        _ensure_real_task(client, backbone)
        r = client.post(
            f"/v1/tasks/{REAL_TASK}/classify",
            data=png_bytes(0),
            headers={**AUTH, "content-type": "image/png"},
        )
        assert r.status_code == 200, r.text


def _params(spec: dict, name: str) -> list[dict]:
    return [
        p
        for ops in spec["paths"].values()
        for op in ops.values()
        for p in op.get("parameters", [])
        if p["name"] == name
    ]


def _string_schema(p: dict) -> dict:
    s = p["schema"]
    return next((a for a in s.get("anyOf", []) if a.get("type") == "string"), s)


def test_openapi_declares_what_the_server_enforces():
    """What the server enforces is declared, so the fuzzer's schema-valid requests are ones it accepts:
    the id rule on `task_id`, `tenant` and `cursor` (checked by the routes: 400; a `tenant` or `cursor`
    over 64 characters: 422), and 403 (`tenant` from a non-admin, a full task quota)."""
    spec = _app_schema()
    for name in ("task_id", "tenant", "cursor"):
        params = _params(spec, name)
        assert params, name
        for p in params:
            s = _string_schema(p)
            assert (s.get("pattern"), s.get("maxLength")) == (ID_RULE, ID_MAX_LEN), (name, s)
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            if path.startswith("/v1/"):
                assert "403" in op["responses"], f"{method.upper()} {path}"
