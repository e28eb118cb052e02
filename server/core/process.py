"""The two kinds of process the supervisor (`server.core.supervisor`) starts: the engine core and the
API servers. Both are spawned (fresh interpreters: no CUDA state or locks inherited) and rebuild their
`Settings` from the same flags and environment as the supervisor's.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import sys
import threading
from collections.abc import Callable
from multiprocessing import parent_process
from multiprocessing.connection import Connection, wait
from typing import Any

from server.exits import (
    EXIT_BACKBONE_UNAVAILABLE,
    EXIT_ENGINE_DIED,
    EXIT_OK,
    EXIT_STARTUP_FAILED,
    report_unavailable,
)

log = logging.getLogger(__name__)

# The supervisor stops the core with this, after the API servers: a SIGTERM to the whole process group
# (systemd's default) must not drain the core under API servers still finishing their requests.
CORE_STOP = signal.SIGUSR1
CORE_LOST_GRACE_S = 2.0  # an API server that lost the core answers 503 this long, then exits 1


def _setup(overrides: dict[str, Any], name: str) -> Any:
    from server.settings import Settings
    from server.threads import name_process

    name_process(name)
    # Ctrl-C reaches every process of the terminal's group: only the supervisor acts on it (it stops
    # the API servers before the core). A SIGHUP (tenants reload, forwarded by the supervisor) must not
    # kill a process still starting: API servers install their handler once started.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    settings = Settings(**overrides)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s [%(processName)s] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return settings


def watch_parent(on_death: Callable[[], None]) -> None:
    """Call `on_death` (from a thread) if the supervisor is gone, killed outright: a child must not keep
    the port, the device or the shared memory of a server that no longer exists."""
    parent = parent_process()
    if parent is None:
        return

    def watch() -> None:
        wait([parent.sentinel])
        log.error("the supervisor is gone: stopping")
        on_death()

    threading.Thread(target=watch, name="vpt-parent-watch", daemon=True).start()


def _largest_pixels(settings: Any, img_size: int) -> int:
    return int(settings.max_images_per_request) * 3 * img_size * img_size


def arena_bytes(settings: Any, img_size: int) -> int:
    """Each API server's image arena: two of the largest requests, at least 32 MiB. With GPU decoding a
    request's block may also hold JPEGs, up to as many bytes again (`jpeg_budget`)."""
    if settings.api_arena_bytes:
        return int(settings.api_arena_bytes)
    largest = _largest_pixels(settings, img_size) * (2 if settings.gpu_decode else 1)
    return max(32 << 20, 2 * largest)


def jpeg_budget(settings: Any, img_size: int, arena: int) -> int:
    """The JPEG bytes one request may hand the core's GPU decoder: what is left of half the arena after
    the largest request's pixels (the rest of its JPEGs, Pillow's), so two requests always fit."""
    return max(0, arena // 2 - _largest_pixels(settings, img_size))


# --- the engine core -------------------------------------------------------------------------------


def core_main(overrides: dict[str, Any], socket_path: str, ready: Connection) -> None:
    settings = _setup(overrides, "vpt-core")
    sys.exit(asyncio.run(_serve_core(settings, socket_path, ready)))


async def _serve_core(settings: Any, socket_path: str, ready: Connection) -> int:
    from server.core.local import LocalCore, open_settings_store
    from server.core.serve import CoreServer
    from server.metrics import Metrics
    from server.metrics_listener import MetricsListener
    from vpt.hub import BackboneUnavailable

    loop = asyncio.get_running_loop()
    metrics = Metrics(tenant_labels=settings.metrics_tenant_labels)
    listener = store = None
    try:
        if settings.metrics_port is not None:
            # Here, where the bank and the queues are: the scrape reads them directly.
            host = settings.metrics_host or settings.host
            listener = MetricsListener(
                metrics.exposition(), host, settings.metrics_port, settings.metrics_token
            )
        store = open_settings_store(settings)
        core = await LocalCore.start(settings, store, metrics)
    except BackboneUnavailable as e:
        if settings.log_level.lower() == "debug":
            log.exception("backbone unavailable")
        report_unavailable(e.spec, e.reason, e.ways_out)
        return EXIT_BACKBONE_UNAVAILABLE
    except Exception:
        log.exception("the engine core failed to start")
        return EXIT_STARTUP_FAILED
    server = CoreServer(core, socket_path)
    stop, died = asyncio.Event(), asyncio.Event()
    # SIGTERM is the API servers' (a process group's SIGTERM reaches the core too): the supervisor
    # stops the core with CORE_STOP once they are done.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    loop.add_signal_handler(CORE_STOP, stop.set)
    core.engine.on_death(lambda: loop.call_soon_threadsafe(died.set))
    watch_parent(lambda: loop.call_soon_threadsafe(stop.set))
    try:
        await server.start()
        gc.collect()
        gc.freeze()  # as the API servers do (services.py): no full collection over the startup's objects
        ready.send({"ready": True, "arena_bytes": arena_bytes(settings, core.info.cfg.img_size)})
        ready.close()
        await asyncio.wait(
            [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(died.wait())],
            return_when=asyncio.FIRST_COMPLETED,
        )
        if died.is_set():
            log.error("the engine process died: failing every request in flight")
            server.drop_all("the engine died")  # each API server answers 503 (and /healthz 503)
            await server.close()
            await core.stop(timeout_s=0)
            return EXIT_ENGINE_DIED
        # The supervisor stops the API servers first: what is left here is theirs to finish.
        await server.close()
        await core.stop(timeout_s=settings.request_timeout_s)
        return EXIT_OK
    finally:
        if listener is not None:
            await asyncio.to_thread(listener.close)
        if store is not None:
            store.close()


# --- an API server ----------------------------------------------------------------------------------


def api_main(overrides: dict[str, Any], address: Any, sock: socket.socket, name: str) -> None:
    import uvicorn

    from server.__main__ import GracefulServer
    from server.app import create_app

    settings = _setup(overrides, name)
    app = create_app(settings, core=address)
    config = uvicorn.Config(
        app,
        log_level=settings.log_level,
        access_log=False,  # our JSON access log replaces uvicorn's
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
    )
    server = GracefulServer(config)
    server.signals = (signal.SIGTERM,)  # SIGINT stays ignored: the supervisor's
    watch_parent(server.stop)
    # Its connection to the core lost: answer 503 (and /healthz 503) for a moment, then exit 1. If the
    # core is gone the supervisor stops everything; if only this connection broke, it replaces this.
    app.state.on_engine_death = lambda: threading.Timer(CORE_LOST_GRACE_S, server.fail).start()
    try:
        server.run(sockets=[sock])
    except SystemExit:  # uvicorn's way out of a failed start-up
        sys.exit(EXIT_STARTUP_FAILED)
    sys.exit(EXIT_ENGINE_DIED if server.failed else EXIT_OK)
