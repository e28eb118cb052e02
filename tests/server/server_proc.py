"""A real `vpt-serve` process on 127.0.0.1 for integration tests (TGI-style fixture).

Starts the console entry point in a subprocess, polls /readyz, fails fast with the server log if the
process dies, and stops it with SIGTERM (the graceful path).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """vpt-serve on 127.0.0.1 with `settings` as VPT_* variables; `command` replaces `python -m server`."""

    def __init__(self, tmp: Path, command: list[str] | None = None, **settings: object) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"server-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("VPT_")}
        env.update({"VPT_HOST": "127.0.0.1", "VPT_PORT": str(self.port), "VPT_STORE": str(tmp / "store")})
        settings.setdefault("open_mode", "true")  # tests that need keys pass tenants_file and open_mode=false
        # TEST_API_SERVERS=N runs every test server with N API-server processes (VPT_API_SERVERS),
        # whatever the device's default; a test that sets api_servers itself keeps its own.
        if os.environ.get("TEST_API_SERVERS"):
            settings.setdefault("api_servers", os.environ["TEST_API_SERVERS"])
        env.update({f"VPT_{k.upper()}": str(v) for k, v in settings.items()})
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            command or [sys.executable, "-m", "server"], env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vpt-serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"vpt-serve not ready after {timeout}s:\n{self.log()}")

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def children(pid: int) -> list[int]:
    return [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]


def descendants(pid: int) -> list[int]:
    """Every live process `pid` started, and theirs, recursively."""
    found, todo = [], [pid]
    while todo:
        try:
            kids = children(todo.pop())
        except OSError:  # exited meanwhile
            continue
        found += kids
        todo += kids
    return found


def comm(pid: int) -> str:
    """The process's name (`server.threads.name_process`); "" once it has exited."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def engine_pid(server_pid: int) -> int:
    """The server's engine process (`vpt-engine`): a child of the server's multiprocessing fork server,
    in the server process or, with API servers, in the engine core."""
    found = [c for c in descendants(server_pid) if comm(c) == "vpt-engine"]
    assert len(found) == 1, found
    return found[0]
