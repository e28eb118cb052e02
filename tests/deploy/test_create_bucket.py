"""deploy/compose/create-bucket.py (the compose `minio-init` job) against a real S3-protocol server.

moto's server on 127.0.0.1 stands in for MinIO; the script runs as compose runs it: a separate Python
process configured only by the environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

from tests.server.server_proc import free_port

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "compose" / "create-bucket.py"
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def run(store: str, endpoint: str, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "VPT_"))}
    env.update(CREDS, VPT_STORE=store, VPT_S3_ENDPOINT_URL=endpoint, **extra)
    return subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)


def test_creates_the_bucket_once_and_is_idempotent(endpoint):
    first = run("s3://vpt-deploy/store", endpoint)
    assert first.returncode == 0, first.stderr
    assert "created bucket vpt-deploy" in first.stdout
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    assert "vpt-deploy" in {b["Name"] for b in s3.list_buckets()["Buckets"]}
    again = run("s3://vpt-deploy/store", endpoint)
    assert again.returncode == 0 and "exists" in again.stdout, again.stderr


def test_refuses_a_store_that_is_not_s3(endpoint):
    r = run("/data/store", endpoint)
    assert r.returncode == 2 and "s3://bucket" in r.stderr


def test_gives_up_with_a_message_when_the_store_never_answers():
    t0 = time.monotonic()
    r = run("s3://vpt-deploy/store", f"http://127.0.0.1:{free_port()}", VPT_BUCKET_WAIT_S="1")
    assert r.returncode == 1 and "cannot create bucket vpt-deploy" in r.stderr, r.stderr
    assert time.monotonic() - t0 < 30
