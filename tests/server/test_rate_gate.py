"""The rate-limit gate (server.api.middleware.RateGate): refusals before routing, one charge each."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.tenants import generate_key
from tests.server.helpers import METRICS_AUTH, METRICS_TOKEN, keyed_settings

KEY, OTHER = generate_key(), generate_key()


@pytest.fixture
def client(tmp_path):
    settings = keyed_settings(
        tmp_path,
        {"slow": KEY, "other": OTHER},
        {"slow": {"rate_per_s": 0.5}},  # burst: 1 request
        metrics_token=METRICS_TOKEN,
    )
    with TestClient(create_app(settings)) as c:
        yield c


def test_each_request_is_charged_once_and_refusals_come_before_routing(client):
    auth = {"authorization": f"Bearer {KEY}"}
    assert client.get("/v1/info", headers=auth).status_code == 200  # the one token (not two charges)
    # Refused before routing: a body the route would reject (400) and an unknown route (404) both 429.
    for r in (
        client.post("/v1/tasks/t/classify", content=b"not an image", headers=auth),
        client.get("/v1/no-such-route", headers=auth),
        client.get("/v1/info", headers=auth),
    ):
        assert r.status_code == 429, r.text
        assert r.json()["error"]["type"] == "overloaded"
        assert "0.5 requests/s" in r.json()["error"]["message"]
        assert int(r.headers["retry-after"]) >= 1
        assert r.headers["x-request-id"]  # still inside the request-context middleware
    metrics = client.get("/metrics", headers=METRICS_AUTH).text
    assert 'vpt_tenant_requests_total{route="unmatched",status="429",tenant="slow"}' in metrics
    assert 'vpt_rejections_total{reason="rate_limited"} 3.0' in metrics
    # Other tenants, bad keys and missing keys are not affected by (or charged to) that bucket.
    assert client.get("/v1/info", headers={"authorization": f"Bearer {OTHER}"}).status_code == 200
    assert client.get("/v1/info", headers={"authorization": "Bearer vpt_wrong"}).status_code == 401
    assert client.get("/v1/info").status_code == 401


def test_the_first_authorization_header_is_the_one_checked(client):
    """With two Authorization headers the gate reads the first, as Starlette does: a bad key first
    is a 401 even with a good key after it (and the good key is not charged)."""
    headers = [(b"authorization", b"Bearer vpt_wrong"), (b"authorization", f"Bearer {OTHER}".encode())]
    r = client.get("/v1/info", headers=headers)
    assert r.status_code == 401 and r.json()["error"]["message"] == "invalid API key"
    swapped = client.get("/v1/info", headers=headers[::-1])
    assert swapped.status_code == 200
