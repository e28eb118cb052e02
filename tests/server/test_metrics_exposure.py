"""Who may read the metrics, and where: VPT_METRICS_PORT, VPT_METRICS_TOKEN, VPT_METRICS_TENANT_LABELS.

The metrics name every tenant and their traffic by route and status, which no tenant may see of
another. Real `vpt-serve` processes on 127.0.0.1 with API keys (tenant `acme-corp`, admin `root`):
- with a metrics port, /metrics is served there alone (with the token when one is set) and the API
  port answers 404 to everyone;
- with a token and no metrics port, the API port's /metrics wants the token (not an API key);
- with neither, it wants an admin API key (open mode: every caller is the admin);
- with tenant labels off, no tenant name is in the output.
"""

from __future__ import annotations

import socket

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from server.app import create_app
from server.metrics_listener import MetricsListener
from server.settings import Settings
from server.tenants import generate_key
from tests.server.helpers import BACKBONE_SPEC, METRICS_AUTH, METRICS_TOKEN, write_tenants
from tests.server.server_proc import ServerProcess, free_port

KEYS = {"acme-corp": generate_key(), "root": generate_key()}
ROLES = {"root": {"role": "admin"}}
ACME_INFO = 'vpt_tenant_requests_total{route="/v1/info",status="200",tenant="acme-corp"} 1.0'


def auth(tenant: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[tenant]}"}


def keyed_server(tmp, **settings: object) -> ServerProcess:
    tenants = write_tenants(tmp, KEYS, ROLES)
    return ServerProcess(
        tmp, backbone=BACKBONE_SPEC, open_mode="false", tenants_file=tenants, **settings
    ).wait_ready()


def assert_refused(r: httpx.Response, status: int, type_: str) -> None:
    assert r.status_code == status, r.text
    assert r.json()["error"]["type"] == type_
    if status == 401:
        assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.integration
def test_metrics_port_serves_metrics_alone_and_the_api_port_none(tmp_path):
    port = free_port()
    proc = keyed_server(tmp_path, metrics_port=port, metrics_token=METRICS_TOKEN)
    scrape = f"http://127.0.0.1:{port}/metrics"
    try:
        assert httpx.get(f"{proc.url}/v1/info", headers=auth("acme-corp")).status_code == 200
        # The API port has no /metrics for anyone: admins, the token's holder, nobody.
        for headers in ({}, auth("root"), METRICS_AUTH):
            assert_refused(httpx.get(f"{proc.url}/metrics", headers=headers), 404, "not_found")
        assert "/metrics" not in httpx.get(f"{proc.url}/openapi.json").json()["paths"]
        # The metrics port: the token, and nothing else, opens it.
        for headers in (
            {},
            auth("root"),
            {"authorization": f"Bearer {METRICS_TOKEN}x"},
            {"authorization": METRICS_TOKEN},
        ):
            assert_refused(httpx.get(scrape, headers=headers), 401, "unauthorized")
        r = httpx.get(scrape, headers=METRICS_AUTH)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        assert ACME_INFO in r.text  # tenant labels are on by default
        assert "vpt_batch_size_bucket" in r.text
        # Only /metrics, only GET.
        for path in ("/", "/healthz", "/v1/info", "/metrics/"):
            assert_refused(
                httpx.get(f"http://127.0.0.1:{port}{path}", headers=METRICS_AUTH), 404, "not_found"
            )
        assert httpx.post(scrape, headers=METRICS_AUTH).status_code == 405
    finally:
        assert proc.stop() == 0, proc.log()
    assert METRICS_TOKEN not in proc.log()


def test_the_listener_frees_its_port_and_idle_connections(tmp_path):
    """In one process, as an embedded app or a test suite runs it: `close` gives the port back (a
    listening socket left open would refuse the bind below), and an idle connection does not hold a
    thread for ever (this port may need no token)."""
    listener = MetricsListener(CollectorRegistry(), "127.0.0.1", 0, None)
    port = listener.port
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/metrics").status_code == 200
        idle = socket.create_connection(("127.0.0.1", port))
        idle.settimeout(15)  # the handler closes it after 5 s
        assert idle.recv(1) == b"", "an idle connection was not closed"
        idle.close()
    finally:
        listener.close()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


@pytest.mark.integration
def test_token_guards_the_api_port_and_tenant_labels_can_be_left_out(tmp_path):
    proc = keyed_server(tmp_path, metrics_token=METRICS_TOKEN, metrics_tenant_labels="false")
    url = f"{proc.url}/metrics"
    try:
        for tenant in KEYS:
            assert httpx.get(f"{proc.url}/v1/info", headers=auth(tenant)).status_code == 200
        # With a token, an API key (even an admin's) does not open /metrics: Prometheus holds the token.
        for headers in ({}, auth("root"), auth("acme-corp"), {"authorization": "Bearer not-the-token"}):
            assert_refused(httpx.get(url, headers=headers), 401, "unauthorized")
        r = httpx.get(url, headers=METRICS_AUTH)
        assert r.status_code == 200, r.text
        assert 'vpt_request_duration_seconds_count{route="/v1/info",status="200"} 2.0' in r.text
        assert "vpt_tenant_requests_total" not in r.text
        for name in KEYS:
            assert name not in r.text
    finally:
        assert proc.stop() == 0, proc.log()
    assert METRICS_TOKEN not in proc.log()


@pytest.mark.integration
def test_by_default_the_api_port_wants_an_admin_key(tmp_path):
    proc = keyed_server(tmp_path)
    url = f"{proc.url}/metrics"
    try:
        assert httpx.get(f"{proc.url}/v1/info", headers=auth("acme-corp")).status_code == 200
        assert_refused(httpx.get(url), 401, "unauthorized")
        assert_refused(httpx.get(url, headers={"authorization": "Bearer vpt_wrong"}), 401, "unauthorized")
        assert_refused(httpx.get(url, headers=auth("acme-corp")), 403, "forbidden")
        r = httpx.get(url, headers=auth("root"))
        assert r.status_code == 200 and ACME_INFO in r.text
        # Scrapes are not charged to the admin's rate limit nor counted as its requests.
        assert 'tenant="root"' not in r.text
    finally:
        assert proc.stop() == 0, proc.log()


def test_open_mode_serves_metrics_to_every_caller(tmp_path):
    """Open mode (loopback, development): every caller is the admin, so /metrics needs no key."""
    settings = Settings(
        backbone=BACKBONE_SPEC, store=str(tmp_path / "store"), open_mode=True, access_log=False
    )
    with TestClient(create_app(settings)) as client:
        assert client.get("/v1/info").status_code == 200
        r = client.get("/metrics")
        assert r.status_code == 200
        assert 'vpt_tenant_requests_total{route="/v1/info",status="200",tenant="default"} 1.0' in r.text


# --- settings ------------------------------------------------------------------------------------------


def test_token_file_is_read_and_the_token_never_shown(tmp_path):
    path = tmp_path / "metrics-token"
    path.write_text(METRICS_TOKEN + "\n")  # as `openssl rand -hex 32 > file` writes it
    s = Settings(metrics_token_file=str(path))
    assert s.metrics_token is not None and s.metrics_token.get_secret_value() == METRICS_TOKEN
    assert METRICS_TOKEN not in repr(s) and METRICS_TOKEN not in str(s)


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        ({"metrics_token": "tiny-secret"}, "at least 16"),
        ({"metrics_token": METRICS_TOKEN, "metrics_token_file": "/dev/null"}, "not both"),
        ({"metrics_token_file": "/nonexistent/metrics-token"}, "cannot read"),
        ({"metrics_token": METRICS_TOKEN, "port": 9464, "metrics_port": 9464}, "must differ"),
    ],
)
def test_bad_metrics_settings_are_refused_without_showing_the_token(kw, words):
    with pytest.raises(ValidationError) as e:
        Settings(**kw)
    assert words in str(e.value)
    assert METRICS_TOKEN not in str(e.value) and "tiny-secret" not in str(e.value)
