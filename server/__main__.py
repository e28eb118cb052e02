"""`vpt-serve` / `python -m server`: run the server with settings from the environment (VPT_*)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator

import uvicorn

from server.app import create_app
from server.settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vpt-serve",
        description="Serve Visual Prompt Tuning tasks. Every setting is also an environment variable "
        "VPT_<NAME> (e.g. VPT_BACKBONE, VPT_STORE); flags override the environment.",
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
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,  # our JSON access log replaces uvicorn's
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
    )
    server = _Server(config)
    app.state.on_engine_death = server.fail
    server.run()
    return 1 if server.failed else 0


class _Server(uvicorn.Server):
    """SIGTERM/SIGINT: stop accepting, finish in-flight requests, run the lifespan shutdown (which
    drains the scheduler), then exit 0. Stock uvicorn re-raises the signal afterwards, which turns a
    clean shutdown into exit status -15 for supervisors. `fail` (any thread): the same shutdown, exit 1."""

    failed = False

    def fail(self) -> None:
        self.failed = True
        self.should_exit = True  # uvicorn's main loop checks it every 0.1 s

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
