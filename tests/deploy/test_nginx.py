"""deploy/nginx/nginx.conf routes by task id: run it with a real nginx in front of two stub replicas.

The config is used as written except for what only makes sense inside compose: the upstream host
names (vpt-1, vpt-2) become two stub HTTP servers on 127.0.0.1, the listen port a free loopback port,
and temp/pid paths a scratch directory. The stubs answer with their own name and the request headers
they got, so the test sees where each request landed.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.server.server_proc import free_port

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "deploy" / "nginx" / "nginx.conf"
NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
pytestmark = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (Debian: apt-get install -y nginx; .ci/run does this)"
)


class Stub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, name: str) -> None:
        self.name = name
        self.connections: set[socket.socket] = set()
        super().__init__(("127.0.0.1", 0), _Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """Down like a dead replica: no listener, and nginx's kept-alive connections cut too."""
        self.shutdown()
        self.server_close()
        for conn in list(self.connections):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no 40 ms delayed-ACK stalls
        self.server.connections.add(self.connection)  # type: ignore[attr-defined]

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        body = json.dumps(
            {"replica": self.server.name, "path": self.path, "request_id": self.headers.get("x-request-id")}  # type: ignore[attr-defined]
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, Stub]]]:
    tmp = tmp_path_factory.mktemp("nginx")
    stubs = {name: Stub(name) for name in ("vpt-1", "vpt-2")}
    port = free_port()
    conf = CONF.read_text()
    for name, stub in stubs.items():
        conf, n = re.subn(rf"server {name}:8000", f"server 127.0.0.1:{stub.server_address[1]}", conf)
        assert n == 1, f"upstream {name} not in nginx.conf"
    conf, n = re.subn(r"listen 8080;", f"listen 127.0.0.1:{port};", conf)
    assert n == 1
    temp = "\n".join(
        f"    {d}_temp_path {tmp / d};" for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = conf.replace("http {\n", "http {\n" + temp + "\n", 1)
    (tmp / "nginx.conf").write_text(conf)
    log = open(tmp / "nginx.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            NGINX,
            "-e",
            "stderr",
            "-p",
            str(tmp),
            "-c",
            str(tmp / "nginx.conf"),
            "-g",
            f"daemon off; pid {tmp}/nginx.pid;",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while True:
        assert proc.poll() is None, (tmp / "nginx.log").read_text()
        try:
            httpx.get(f"{url}/v1/info", timeout=1)
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline, (tmp / "nginx.log").read_text()
            time.sleep(0.05)
    try:
        yield url, stubs
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
        for stub in stubs.values():
            stub.stop()


_client = httpx.Client(timeout=5)


def replica(url: str, method: str, path: str, **kw: object) -> str:
    r = _client.request(method, url + path, **kw)  # type: ignore[arg-type]
    assert r.status_code == 200, r.text
    return r.json()["replica"]


def test_every_route_of_a_task_lands_on_one_replica_and_tasks_spread(proxy):
    url, _ = proxy
    placed: dict[str, str] = {}
    for i in range(40):
        task = f"task-{i}"
        seen = {
            replica(url, "POST", f"/v1/tasks/{task}/classify?top_k=3", content=b"img"),
            replica(url, "POST", f"/v1/tasks/{task}/embed", content=b"img"),
            replica(url, "PUT", f"/v1/tasks/{task}", content=b"artifact"),
            replica(url, "GET", f"/v1/tasks/{task}"),
            replica(url, "POST", f"/v1/tasks/{task}/classify?top_k=1", content=b"img"),
        }
        assert len(seen) == 1, f"{task} spread over {seen}"
        placed[task] = seen.pop()
    counts = {r: list(placed.values()).count(r) for r in ("vpt-1", "vpt-2")}
    assert min(counts.values()) >= 8, f"40 tasks over 2 replicas: {counts}"


def test_other_routes_spread_over_replicas(proxy):
    url, _ = proxy
    seen = [replica(url, "GET", "/v1/info") for _ in range(30)]
    assert set(seen) == {"vpt-1", "vpt-2"}


def test_request_ids_pass_through_or_are_made(proxy):
    url, _ = proxy
    r = httpx.get(f"{url}/v1/tasks/a", headers={"x-request-id": "client-id-1"})
    assert r.json()["request_id"] == "client-id-1"
    made = httpx.get(f"{url}/v1/tasks/a").json()["request_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)


def test_metrics_are_not_proxied(proxy):
    url, _ = proxy
    assert httpx.get(f"{url}/metrics").status_code == 404


def test_a_down_replica_tasks_move_to_the_other(proxy):
    """Runs last (it stops a stub): a refused connection sends even a POST to the next replica."""
    url, stubs = proxy
    task = next(f"t{i}" for i in range(100) if replica(url, "POST", f"/v1/tasks/t{i}/classify") == "vpt-2")
    stubs["vpt-2"].stop()
    for _ in range(3):
        assert replica(url, "POST", f"/v1/tasks/{task}/classify", content=b"img") == "vpt-1"
