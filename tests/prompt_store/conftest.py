"""Fixtures for the prompt-store tests.

- `store_spec` / `store`: one parametrized fixture, two backends — a local directory under tmp_path and
  a fresh bucket on a real S3-protocol server (moto's server mode, in its own process on 127.0.0.1,
  reached by boto3 over HTTP: the session fixture `s3_endpoint` in tests/conftest.py, shared with the
  server tests). Every contract test runs against both.
- `make_artifact`: tiny valid task artifacts (D=8, a few classes) built with the real writer.
- `fork_server`: a helper process that has paid for `import torch` once and forks children on demand,
  so the crash test can SIGKILL 50+ real writer processes in seconds, not minutes.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
import torch

from prompt_store.artifact import TaskArtifact, save_artifact
from prompt_store.base import PromptStore
from prompt_store.manifest import version_name
from prompt_store.url import open_store

REPO_ROOT = Path(__file__).resolve().parents[2]
S3_CREDENTIALS = {"region": "us-east-1", "access_key_id": "testing", "secret_access_key": "testing"}


@functools.cache
def s3_client(endpoint: str) -> Any:
    """A plain boto3 client on the test server, for set-up and for tampering behind the store's back."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=S3_CREDENTIALS["region"],
        aws_access_key_id=S3_CREDENTIALS["access_key_id"],
        aws_secret_access_key=S3_CREDENTIALS["secret_access_key"],
    )


@dataclass
class StoreSpec:
    """How to open one backend's store: picklable/JSON-able, so child processes can open it too."""

    backend: str  # "local" | "s3"
    url: str  # what open_store() takes
    options: dict[str, Any] = field(default_factory=dict)  # keyword options for open_store()
    root: Path | None = None  # local: the store directory
    endpoint: str | None = None  # s3: the server URL
    bucket: str | None = None  # s3: the bucket
    prefix: str = ""  # s3: key prefix inside the bucket

    def open(self, **overrides: Any) -> PromptStore:
        return open_store(self.url, **{**self.options, **overrides})

    # Raw access through the documented layout (docs/store.md), bypassing the store.
    def raw_names(self, tenant: str, task_id: str) -> set[str]:
        """Names of everything stored under one task (files / key suffixes)."""
        if self.backend == "local":
            assert self.root is not None
            directory = self.root / "tenants" / tenant / "tasks" / task_id
            return set(os.listdir(directory)) if directory.is_dir() else set()
        prefix = f"{self.prefix}/tenants/{tenant}/tasks/{task_id}/"
        listing = s3_client(self.endpoint).list_objects_v2(Bucket=self.bucket, Prefix=prefix)  # type: ignore[arg-type]
        return {obj["Key"][len(prefix) :] for obj in listing.get("Contents", [])}

    def overwrite_version(self, tenant: str, task_id: str, version: int, data: bytes) -> None:
        """Replace one stored version's bytes (simulated bit rot / tampering)."""
        name = version_name(version)
        assert name in self.raw_names(tenant, task_id), f"{name} is not stored"
        if self.backend == "local":
            assert self.root is not None
            (self.root / "tenants" / tenant / "tasks" / task_id / name).write_bytes(data)
        else:
            key = f"{self.prefix}/tenants/{tenant}/tasks/{task_id}/{name}"
            s3_client(self.endpoint).put_object(Bucket=self.bucket, Key=key, Body=data)  # type: ignore[arg-type]


def new_bucket(endpoint: str) -> str:
    bucket = f"vpt-{uuid.uuid4().hex[:16]}"
    s3_client(endpoint).create_bucket(Bucket=bucket)
    return bucket


def _spec(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> StoreSpec:
    if backend == "local":
        root = tmp_path / "store"
        return StoreSpec(backend="local", url=str(root), root=root)
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = new_bucket(endpoint)
    return StoreSpec(
        backend="s3",
        url=f"s3://{bucket}/store",
        options={"endpoint_url": endpoint, **S3_CREDENTIALS},
        endpoint=endpoint,
        bucket=bucket,
        prefix="store",
    )


@pytest.fixture(params=["local", "s3"])
def store_spec(request: pytest.FixtureRequest, tmp_path: Path) -> StoreSpec:
    """One empty store per test, on each backend in turn."""
    return _spec(request.param, request, tmp_path)


@pytest.fixture
def store(store_spec: StoreSpec) -> Iterator[PromptStore]:
    s = store_spec.open()
    try:
        yield s
    finally:
        s.close()


def build_artifact(
    seed: int,
    *,
    num_classes: int = 3,
    prompt_length: int = 2,
    mode: str = "shallow",
    depth: int = 2,
    dim: int = 8,
    name: str | None = None,
) -> bytes:
    """A tiny valid artifact; different seeds give different bytes (and sha256)."""
    g = torch.Generator().manual_seed(seed)
    layers = 1 if mode == "shallow" else depth
    artifact = TaskArtifact(
        prompts=torch.randn(layers, prompt_length, dim, generator=g),  # (L_p, P, D)
        head_weight=torch.randn(num_classes, dim, generator=g),  # (C, D)
        head_bias=torch.randn(num_classes, generator=g),  # (C,)
        mode=mode,  # type: ignore[arg-type]
        backbone="vit_test_tiny",
        backbone_fingerprint="sha256:test-backbone",
        labels=[f"class-{seed}-{i}" for i in range(num_classes)],
        name=name,
    )
    return save_artifact(artifact)


@pytest.fixture(scope="session")
def make_artifact() -> Callable[..., bytes]:
    """`build_artifact` as a fixture (test modules cannot import conftest under importlib mode)."""
    return build_artifact


# ------------------------------------------------------------------------------------ fork server
_FORK_SERVER = r"""
import json, os, sys, traceback
import prompt_store.artifact, prompt_store.local, prompt_store.s3, prompt_store.url  # torch, boto3: once
# Parse botocore's S3 model once too (no network: the client is never used); children inherit it.
prompt_store.s3.S3Store("warm-up", endpoint_url="http://127.0.0.1:9", access_key_id="x",
                        secret_access_key="x", region="us-east-1").close()

out = sys.stdout
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "spawn":
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                fd = os.open(cmd["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # never read the server's command pipe
                exec(compile(cmd["code"], "<child>", "exec"), {"__name__": "__child__", "ARGS": cmd["args"]})
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        out.write(json.dumps({"pid": pid}) + "\n")
    elif cmd["op"] == "wait":
        _, status = os.waitpid(cmd["pid"], 0)
        signal = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        out.write(json.dumps({"signal": signal, "code": code}) + "\n")
    out.flush()
"""


class ForkServer:
    """Forks worker processes from a pre-imported Python (fresh interpreter state, no pytest inside).

    A child runs `code` with the JSON-able dict `ARGS` in its globals; its stdout/stderr go to `log`.
    Children are real processes: separate address spaces, their own store instances, killable.
    """

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        env["OMP_NUM_THREADS"] = "1"  # tiny tensors; no thread pool per child
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _FORK_SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
            env=env,
        )

    def _call(self, **cmd: Any) -> dict[str, Any]:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps(cmd) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fork server died (exit code {self._proc.poll()})")
        return json.loads(line)

    def spawn(self, code: str, args: dict[str, Any], log: Path) -> int:
        """Start a child; returns its pid."""
        return int(self._call(op="spawn", code=code, args=args, log=str(log))["pid"])

    def wait(self, pid: int) -> tuple[int | None, int | None]:
        """Reap a child: (terminating signal or None, exit code or None)."""
        reply = self._call(op="wait", pid=pid)
        return reply["signal"], reply["code"]

    def close(self) -> None:
        if self._proc.stdin:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()


@pytest.fixture(scope="session")
def fork_server() -> Iterator[ForkServer]:
    server = ForkServer()
    try:
        yield server
    finally:
        server.close()


def wait_for_line(path: Path, needle: str, timeout: float = 30.0) -> None:
    """Poll a child's report file until a line contains `needle` (child start-up barrier)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and needle in path.read_text():
            return
        time.sleep(0.001)
    raise TimeoutError(f"{path} never contained {needle!r}")


@pytest.fixture(scope="session")
def wait_for() -> Callable[..., None]:
    return wait_for_line
