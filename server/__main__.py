"""`vpt-serve` / `python -m server`: run the server with settings from the environment (VPT_*).

Exit status (`server/exits.py`, also in `vpt-serve --help` and docs/troubleshooting.md): 0 stopped by
SIGTERM or SIGINT after a clean drain, 1 the engine (process or engine-core process) died while
serving, or API servers kept dying (or an unexpected error, with its traceback), 2 usage, 3 start-up
failed otherwise (uvicorn's status, e.g. the port is taken: the log says why), 4 the backbone is
unavailable (one message naming the spec and the ways out; the traceback only with
VPT_LOG_LEVEL=debug).

With API servers (`VPT_API_SERVERS`, the default on CUDA) this process is their supervisor
(`server/core/supervisor.py`); with none it serves HTTP and computes itself.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import socket
import sys
import threading
from collections.abc import Iterator

try:
    import uvicorn
    from fastapi import FastAPI

    from server.app import create_app
    from server.core.supervisor import Supervisor
    from server.engine.engine import pick_device
    from server.exits import (
        EXIT_BACKBONE_UNAVAILABLE,
        EXIT_ENGINE_DIED,
        EXIT_HELP,
        EXIT_OK,
        EXIT_STARTUP_FAILED,
        report_unavailable,
    )
    from server.services import open_tenants
    from server.settings import Settings
    from server.threads import available_cpus
    from vpt.hub import BackboneUnavailable
except ModuleNotFoundError as e:
    # A client-only install (`pip install vpt-serve`, no extras) has the `vpt-serve` command but not
    # what it runs on: say which extra brings it, rather than a traceback. Our own modules missing is
    # a broken checkout, and re-raised as it is.
    if (e.name or "").split(".")[0] in ("server", "vpt", "prompt_store", "clients"):
        raise
    print(
        f"vpt-serve: error: this environment lacks the server's packages (no module {e.name!r}): "
        "pip install 'vpt-serve[server]' (a checkout: bash scripts/serve.sh)",
        file=sys.stderr,
    )
    raise SystemExit(3) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vpt-serve",
        description="Serve Visual Prompt Tuning tasks. Every setting is also an environment variable\n"
        "VPT_<NAME> (e.g. VPT_BACKBONE, VPT_STORE); flags override the environment.",
        epilog=EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--backbone", help="hf-hub:<repo>[@rev], a checkpoint path, or random:<preset>[@seed]"
    )
    parser.add_argument("--store", help="prompt store: a directory, file:///path or s3://bucket/prefix")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--device")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    settings = Settings(**overrides)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    api_servers = settings.effective_api_servers(pick_device(settings.device).type, available_cpus())
    if api_servers:
        return _supervise(overrides, settings, api_servers)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,  # our JSON access log replaces uvicorn's
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
    )
    if settings.log_level.lower() != "debug":
        logging.getLogger("uvicorn.error").addFilter(_ExplainedStartupFailure(app))
    server = GracefulServer(config)
    app.state.on_engine_death = server.fail
    try:
        server.run()
    except SystemExit:  # uvicorn's way out of a failed start-up (status 3)
        error = _explained(app)
        if error is None:
            raise
        report_unavailable(error.spec, error.reason, error.ways_out)
        return EXIT_BACKBONE_UNAVAILABLE
    return EXIT_ENGINE_DIED if server.failed else EXIT_OK


def _supervise(overrides: dict[str, object], settings: Settings, api_servers: int) -> int:
    """The engine core and `api_servers` API-server processes on one listening socket (`Supervisor`)."""
    open_tenants(settings)  # once, here: a first start creates the tenants file and shows its key
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    try:
        sock = socket.create_server((settings.host, settings.port), family=family, backlog=2048)
    except OSError as e:
        logging.getLogger("server").error("cannot listen on %s:%d: %s", settings.host, settings.port, e)
        return EXIT_STARTUP_FAILED
    with sock:
        return Supervisor(overrides, settings, api_servers, sock).run()


def _explained(app: FastAPI) -> BackboneUnavailable | None:
    """The start-up failure `main` explains itself, if that is why the start failed."""
    error = getattr(app.state, "startup_error", None)  # set by the lifespan
    return error if isinstance(error, BackboneUnavailable) else None


class _ExplainedStartupFailure(logging.Filter):
    """Drops uvicorn's own report of a start-up failure that `main` explains (the lifespan's traceback,
    "Application startup failed. Exiting."), so the user reads one message instead of ~140 lines.
    Not installed at VPT_LOG_LEVEL=debug, where the traceback is wanted."""

    def __init__(self, app: FastAPI) -> None:
        super().__init__()
        self.app = app

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR or _explained(self.app) is None


class GracefulServer(uvicorn.Server):
    """SIGTERM/SIGINT: stop accepting, finish in-flight requests, run the lifespan shutdown (which
    drains the scheduler), then exit 0. Stock uvicorn re-raises the signal afterwards, which turns a
    clean shutdown into exit status -15 for supervisors. `fail` (any thread): the same shutdown, exit 1."""

    failed = False
    signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)  # what starts the graceful stop

    def fail(self) -> None:
        self.failed = True
        self.stop()

    def stop(self) -> None:
        self.should_exit = True  # uvicorn's main loop checks it every 0.1 s

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self.handle_exit) for s in self.signals}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
