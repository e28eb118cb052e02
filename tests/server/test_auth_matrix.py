"""Isolation matrix: every route × {no key, bad key, other tenant, own tenant, admin} (issue D).

Another tenant's task must answer exactly like a missing one (404); admins act on any tenant's tasks
with `?tenant=`; keys are required everywhere except the health and readiness endpoints, and
`/metrics` (every tenant's name and traffic) wants an admin's.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.tenants import generate_key
from tests.server.helpers import BACKBONE_SPEC, artifact_bytes, keyed_settings, png_bytes
from vpt.hub import load_backbone

KEYS = {name: generate_key() for name in ("acme", "beta", "root")}
CALLERS = {
    "none": {},
    "bad": {"authorization": "Bearer vpt_not-a-real-key"},
    "other": {"authorization": f"Bearer {KEYS['beta']}"},
    "own": {"authorization": f"Bearer {KEYS['acme']}"},
    "admin": {"authorization": f"Bearer {KEYS['root']}"},
}


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(BACKBONE_SPEC)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    settings = keyed_settings(tmp_path_factory.mktemp("auth"), KEYS, {"root": {"role": "admin"}})
    with TestClient(create_app(settings)) as c:
        yield c


def reset_task(client, backbone) -> tuple[bytes, int]:
    """acme owns a fresh task `t` (uploaded by the admin on acme's behalf); returns (bytes, version).

    Versions are never reused, even across deletes, so the version grows from test to test."""
    client.delete("/v1/tasks/t?tenant=acme", headers=CALLERS["admin"])
    data = artifact_bytes(backbone, P=2, mode="shallow", C=3, seed=0)
    r = client.put(
        "/v1/tasks/t?tenant=acme",
        content=data,
        headers={**CALLERS["admin"], "content-type": "application/octet-stream"},
    )
    assert r.status_code == 201, r.text
    return data, r.json()["version"]


def call(client, route: str, caller: str, data: bytes, version: int):
    headers = dict(CALLERS[caller])
    q = "?tenant=acme" if caller == "admin" else ""
    img = {"content-type": "image/png"}
    if route == "classify":
        return client.post(f"/v1/tasks/t/classify{q}", content=png_bytes(0), headers={**headers, **img})
    if route == "embed":
        return client.post(f"/v1/tasks/t/embed{q}", content=png_bytes(0), headers={**headers, **img})
    if route == "upload":
        octet = {"content-type": "application/octet-stream"}
        return client.put(f"/v1/tasks/t{q}", content=data, headers={**headers, **octet})
    if route == "list":
        return client.get(f"/v1/tasks{q}", headers=headers)
    if route == "show":
        return client.get(f"/v1/tasks/t{q}", headers=headers)
    if route == "delete":
        return client.delete(f"/v1/tasks/t{q}", headers=headers)
    if route == "rollback":
        return client.post(f"/v1/tasks/t/rollback{q}", json={"version": version}, headers=headers)
    if route == "info":
        return client.get("/v1/info", headers=headers)
    raise AssertionError(route)


# Expected status per route and caller. "other" is beta: acme's task is simply not there for it.
EXPECTED = {
    "classify": {"none": 401, "bad": 401, "other": 404, "own": 200, "admin": 200},
    "embed": {"none": 401, "bad": 401, "other": 404, "own": 200, "admin": 200},
    "upload": {"none": 401, "bad": 401, "other": 201, "own": 200, "admin": 200},
    "list": {"none": 401, "bad": 401, "other": 200, "own": 200, "admin": 200},
    "show": {"none": 401, "bad": 401, "other": 404, "own": 200, "admin": 200},
    "delete": {"none": 401, "bad": 401, "other": 404, "own": 204, "admin": 204},
    "rollback": {"none": 401, "bad": 401, "other": 404, "own": 200, "admin": 200},
    "info": {"none": 401, "bad": 401, "other": 200, "own": 200, "admin": 200},
}


@pytest.mark.parametrize("caller", list(CALLERS))
@pytest.mark.parametrize("route", list(EXPECTED))
def test_matrix(client, backbone, route, caller):
    data, version = reset_task(client, backbone)
    r = call(client, route, caller, data, version)
    assert r.status_code == EXPECTED[route][caller], (route, caller, r.text)
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"type", "message"}
    if r.status_code == 401:
        assert r.headers["www-authenticate"] == "Bearer"
    if route == "list" and caller == "other":
        assert r.json()["tasks"] == []  # acme's task is invisible to beta
    if route == "list" and caller in ("own", "admin"):
        assert [t["task_id"] for t in r.json()["tasks"]] == ["t"]
    if route == "upload" and caller == "other":
        # beta created its own task `t`; acme's is untouched.
        assert r.json()["tenant"] == "beta"
        assert client.get("/v1/tasks/t", headers=CALLERS["own"]).json()["version"] == version
        client.delete("/v1/tasks/t", headers=CALLERS["other"])
    if route == "delete" and caller == "other":
        assert client.get("/v1/tasks/t", headers=CALLERS["own"]).status_code == 200


def test_a_missing_key_names_the_header_and_the_cli_variable(client):
    """curl users set a header, `vpt` and SDK users a variable: the 401 speaks to both (it named only
    the header, which a CLI user never sets)."""
    octet = {"content-type": "application/octet-stream"}
    for r in (
        client.get("/v1/info"),
        client.put("/v1/tasks/t", content=b"x" * 100, headers=octet),  # refused before the body
        client.get("/v1/tasks", headers={"authorization": ""}),
    ):
        assert r.status_code == 401, r.text
        message = r.json()["error"]["message"]
        assert message.startswith("missing API key: send the header 'Authorization: Bearer <key>'")
        assert "$VPT_API_KEY" in message


def test_missing_and_foreign_tasks_answer_identically(client, backbone):
    reset_task(client, backbone)
    foreign = client.get("/v1/tasks/t", headers=CALLERS["other"])
    missing = client.get("/v1/tasks/nothing-here", headers=CALLERS["other"])
    assert foreign.status_code == missing.status_code == 404
    assert foreign.json()["error"]["type"] == missing.json()["error"]["type"]
    assert foreign.json()["error"]["message"] == "task beta/t not found"  # only the caller's namespace
    assert missing.json()["error"]["message"] == "task beta/nothing-here not found"


def test_tenant_parameter_is_for_admins_only(client, backbone):
    reset_task(client, backbone)
    r = client.get("/v1/tasks?tenant=acme", headers=CALLERS["other"])
    assert r.status_code == 403 and r.json()["error"]["type"] == "forbidden"
    assert client.get("/v1/tasks?tenant=beta", headers=CALLERS["other"]).status_code == 200  # itself


def test_open_endpoints_need_no_key(client):
    for path in ("/healthz", "/readyz"):
        assert client.get(path).status_code == 200, path


@pytest.mark.parametrize(("caller", "status"), [("none", 401), ("bad", 401), ("own", 403), ("admin", 200)])
def test_metrics_need_an_admin_key(client, caller, status):
    """Without VPT_METRICS_PORT and VPT_METRICS_TOKEN, /metrics is the admins' (test_metrics_exposure.py
    covers the port and the token)."""
    assert client.get("/metrics", headers=CALLERS[caller]).status_code == status


def test_the_gate_holds_under_a_root_path(tmp_path, backbone):
    """Served under a prefix (`uvicorn --root-path`, or mounted in another app) the gate still sees
    the API's routes: no key is a 401 before the id is validated, and a key is admitted and rate-charged
    (the gate once matched the raw path, so every prefixed request went past it unchecked)."""
    settings = keyed_settings(tmp_path, KEYS, {"root": {"role": "admin"}, "beta": {"rate_per_s": 1.0}})
    with TestClient(create_app(settings), root_path="/api") as c:
        for path in ("/api/v1/tasks/UPPER", "/api/v1/tasks", "/api/v1/info"):
            r = c.get(path)
            assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized", (path, r.text)
        assert c.get("/api/v1/tasks", headers=CALLERS["own"]).status_code == 200
        statuses = [c.get("/api/v1/info", headers=CALLERS["other"]).status_code for _ in range(5)]
        assert 429 in statuses, statuses  # beta's 1 request/s (burst 2) is charged under the prefix
