"""`vpt-serve` with API servers: one engine-core process and N API-server processes, supervised.

    supervisor (this process: binds the port, starts and watches the others, computes nothing)
    ├── engine core   (server.core.serve): device, backbone, bank, residency, fair scheduler, executor
    │                 and /metrics on VPT_METRICS_PORT; on CPU its engine process computes the batches
    └── API server ×N (uvicorn + FastAPI on the one listening socket): auth, rate limits, bodies, parsing,
                      decoding; images (or JPEGs, for the GPU decoder) to the core through a
                      shared-memory arena, a frame per request

Failure and lifecycle:
- an API server that dies is replaced; the others' requests go on (the core drops only the dead one's).
  More than `MAX_RESTARTS` deaths within `RESTART_WINDOW_S` is a crash loop: the server stops, status 1;
  one that cannot start (status 3: its log says why) stops the server with status 3;
- the engine core dies (or its engine process does): every request in flight fails with 503, /healthz
  answers 503 for `CORE_DEATH_GRACE_S`, then every process stops and `vpt-serve` exits 1;
- SIGTERM/SIGINT: the API servers stop accepting and finish their requests, then the core drains and
  stops; exit 0 with nothing left running. A supervisor killed outright takes the others with it (each
  watches its parent).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from typing import Any

from prometheus_client import multiprocess

from server.core.client import CoreAddress
from server.core.process import CORE_STOP, api_main, core_main
from server.exits import EXIT_ENGINE_DIED, EXIT_OK, EXIT_STARTUP_FAILED

log = logging.getLogger("server.supervisor")

MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
CORE_DEATH_GRACE_S = 1.0
CORE_START_TIMEOUT_S = 3600.0  # a first hf-hub download can be slow; the core says when it fails


_spawn = multiprocessing.get_context("spawn")


def run_dir() -> str:
    """A private directory on tmpfs for the core's socket, the arenas, the rate-limit table and the
    metrics files (`/dev/shm` where it can be written, else the temp directory)."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    return tempfile.mkdtemp(prefix=f"vpt-serve-{os.getpid()}-", dir=base)


class Supervisor:
    def __init__(
        self, overrides: dict[str, Any], settings: Any, api_servers: int, sock: socket.socket
    ) -> None:
        self.overrides, self.settings, self.n = overrides, settings, api_servers
        self.sock = sock
        self.dir = run_dir()
        self.core: BaseProcess | None = None
        self.apis: dict[int, BaseProcess] = {}  # slot -> its API-server process
        self.deaths: list[float] = []
        self._arenas: str | None = None  # where the arenas go (`_arena_dir`)
        self._wake_r, self._wake_w = os.pipe()
        self.stopping = False

    # --- start -----------------------------------------------------------------------------------

    def run(self) -> int:
        """Start the core, then the API servers; watch them; the exit status for `vpt-serve`."""
        os.makedirs(os.path.join(self.dir, "metrics"))
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.path.join(self.dir, "metrics")  # for the children
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        signal.signal(signal.SIGHUP, self._forward_hup)
        try:
            status = self._start_core()
            if status is not None:  # it failed, or SIGTERM came first: nothing may be left running
                self._stop_all()
                return status
            for slot in range(self.n):
                self._start_api(slot)
            log.info("serving with %d API server(s) and one engine core", self.n)
            status = self._watch()
            self._stop_all()
            return status if status is not None else EXIT_OK
        except BaseException:
            self._stop_all(kill=True)
            raise
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            signal.signal(signal.SIGHUP, signal.SIG_DFL)
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
            shutil.rmtree(self.dir, ignore_errors=True)
            if self._arenas not in (None, self.dir):
                shutil.rmtree(self._arenas, ignore_errors=True)
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _start_core(self) -> int | None:
        """Start the engine core and wait until it serves; None, or the exit status if it failed."""
        parent, child = _spawn.Pipe(duplex=False)
        self.core = _spawn.Process(
            target=core_main, name="vpt-core", args=(self.overrides, self.socket_path, child), daemon=False
        )
        self.core.start()
        child.close()
        with parent:
            return self._await_core(parent)

    def _await_core(self, parent: Any) -> int | None:
        """None once the core says it serves; else the exit status (0 if SIGTERM came first)."""
        assert self.core is not None
        deadline = time.monotonic() + CORE_START_TIMEOUT_S
        while True:
            if self.stopping:
                return 0
            ready = wait(
                [parent, self.core.sentinel, self._wake_r], timeout=max(0.0, deadline - time.monotonic())
            )
            if parent in ready:
                try:
                    message = parent.recv()
                except EOFError:
                    message = None
                if isinstance(message, dict) and message.get("ready"):
                    self.info = message
                    return None
            if parent in ready or self.core.sentinel in ready or time.monotonic() >= deadline:
                self.core.join(10)
                code = self.core.exitcode
                log.error("the engine core did not start (exit status %s)", code)
                return code if isinstance(code, int) and code > 0 else 3
            if self._wake_r in ready:
                os.read(self._wake_r, 64)

    @property
    def socket_path(self) -> str:
        return os.path.join(self.dir, "core.sock")

    def _start_api(self, slot: int) -> None:
        arena = os.path.join(self._arena_dir(), f"arena-{slot}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(arena)  # the dead one's
        address = CoreAddress(
            self.socket_path, arena, self.info["arena_bytes"], os.path.join(self.dir, "rates")
        )
        proc = _spawn.Process(
            target=api_main,
            name=f"vpt-api-{slot}",
            args=(self.overrides, address, self.sock, f"vpt-api-{slot}"),
            daemon=False,
        )
        proc.start()
        self.apis[slot] = proc

    def _arena_dir(self) -> str:
        """Where the API servers' arenas go: the run directory (tmpfs) when it has room for them, else
        a directory on the temp file system (still shared pages, written back to disk now and then)."""
        if self._arenas is None:
            need = self.n * self.info["arena_bytes"] + (16 << 20)
            st = os.statvfs(self.dir)
            if st.f_bavail * st.f_frsize >= need:
                self._arenas = self.dir
            else:
                self._arenas = tempfile.mkdtemp(prefix="vpt-serve-arenas-", dir=tempfile.gettempdir())
                log.warning(
                    "%s has less room than the API servers' image arenas need (%d MiB): they go to %s "
                    "instead. Give the container more shared memory (docker run --shm-size, compose "
                    "shm_size), or lower VPT_API_SERVERS / VPT_API_ARENA_BYTES",
                    self.dir,
                    need >> 20,
                    self._arenas,
                )
        return self._arenas

    # --- watch -----------------------------------------------------------------------------------

    def _watch(self) -> int | None:
        """Until SIGTERM/SIGINT (None) or the core's death (1); replaces API servers that die."""
        assert self.core is not None
        while not self.stopping:
            sentinels = {p.sentinel: slot for slot, p in self.apis.items()}
            ready = wait([self.core.sentinel, self._wake_r, *sentinels], timeout=5.0)
            if self._wake_r in ready:
                os.read(self._wake_r, 64)
            if self.core.sentinel in ready:
                if self.stopping:
                    break
                log.error(
                    "the engine core exited (status %s): stopping the server (exit status %d)",
                    self.core.exitcode,
                    EXIT_ENGINE_DIED,
                )
                time.sleep(CORE_DEATH_GRACE_S)  # the API servers answer 503, /healthz too
                return EXIT_ENGINE_DIED
            for sentinel, slot in sentinels.items():
                if sentinel not in ready or self.stopping:
                    continue
                dead = self.apis[slot]
                dead.join()
                multiprocess.mark_process_dead(dead.pid, os.environ["PROMETHEUS_MULTIPROC_DIR"])
                if dead.exitcode == EXIT_STARTUP_FAILED:  # its log says why; another would fail alike
                    log.error("API server %d could not start: stopping the server", slot)
                    return EXIT_STARTUP_FAILED
                now = time.monotonic()
                self.deaths = [t for t in self.deaths if now - t < RESTART_WINDOW_S] + [now]
                if len(self.deaths) > MAX_RESTARTS:
                    log.error(
                        "API servers died %d times within %.0f s: stopping the server (exit status %d)",
                        len(self.deaths),
                        RESTART_WINDOW_S,
                        EXIT_ENGINE_DIED,
                    )
                    return EXIT_ENGINE_DIED
                log.error(
                    "API server %d (pid %s) exited with status %s: replacing it",
                    slot,
                    dead.pid,
                    dead.exitcode,
                )
                self._start_api(slot)
        return None

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _forward_hup(self, signum: int, frame: Any) -> None:
        """`kill -HUP` re-reads the tenants file: every API server authenticates."""
        for p in self.apis.values():
            if p.pid is not None and p.is_alive():
                os.kill(p.pid, signal.SIGHUP)

    # --- stop ------------------------------------------------------------------------------------

    def _stop_all(self, kill: bool = False) -> None:
        """API servers first (they finish their requests, which the core computes), then the core."""
        self.stopping = True
        timeout = self.settings.request_timeout_s + 10
        for procs, stop in (
            (list(self.apis.values()), signal.SIGTERM),
            ([self.core] if self.core else [], CORE_STOP),
        ):
            for p in procs:
                if p.is_alive() and p.pid is not None:
                    os.kill(p.pid, signal.SIGKILL if kill else stop)
            deadline = time.monotonic() + timeout
            for p in procs:
                p.join(max(0.0, deadline - time.monotonic()))
                if p.is_alive():
                    log.error("%s did not stop within %.0f s: killing it", p.name, timeout)
                    p.kill()
                    p.join()
