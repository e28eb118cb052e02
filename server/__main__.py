"""`vpt-serve` / `python -m server`: run the server with settings from the environment (VPT_*)."""

from __future__ import annotations

import argparse
import logging
import sys

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
    # uvicorn handles SIGTERM/SIGINT: stop accepting, finish in-flight requests, run the lifespan
    # shutdown (which drains the scheduler), exit 0.
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,  # our JSON access log replaces uvicorn's
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
