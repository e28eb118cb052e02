"""A real S3-protocol server for tests: moto's S3 app on 127.0.0.1 in a child process."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

# moto's ThreadedMotoServer serves each request on its own thread, and moto checks S3's conditional
# headers (If-None-Match / If-Match) and then writes in two steps without a lock: two racing requests
# could both pass. Real S3 makes each conditional write atomic, so this server handles one request at
# a time (threaded=False; HTTP/1.0 so a client cannot hold the only connection open between requests).
_MOTO_SERVER = r"""
import logging, sys
from werkzeug.serving import make_server
from moto.moto_server.werkzeug_app import MotoRequestHandler, create_backend_app

class Handler(MotoRequestHandler):
    protocol_version = "HTTP/1.0"

logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
# The S3 app directly, not moto's multi-service dispatcher: S3 is all we need, and the dispatcher's
# per-request service lookup costs a third of the server's time.
server = make_server("127.0.0.1", 0, create_backend_app("s3"), threaded=False, request_handler=Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


@contextlib.contextmanager
def moto_server(log: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Start the server (stderr to `log`); yields (process, endpoint URL); kills it on exit."""
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", _MOTO_SERVER], stdout=subprocess.PIPE, stderr=err, text=True
        )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if not line.strip().isdigit():
            raise RuntimeError(f"moto server did not start:\n{log.read_text()[-4000:]}")
        yield proc, f"http://127.0.0.1:{int(line)}"
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
