"""A backbone that cannot be had is one clear error from `vpt-serve`, within seconds, exit status 4.

Real `vpt-serve` processes, no network needed: the Hub is a local endpoint that refuses connections, one
that accepts them and never answers (where `huggingface_hub`'s own first request, which has no timeout,
waited forever), or switched off with HF_HUB_OFFLINE; the cache is an empty directory. Each start must
end within `BOUND_S` with exit status 4, a message that names the spec and both ways out (a local
checkpoint, `random:<preset>` with the preset names), and no traceback unless VPT_LOG_LEVEL=debug.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.__main__ import EXIT_BACKBONE_UNAVAILABLE
from tests.server.server_proc import ServerProcess, free_port
from vpt.config import PRESETS

pytestmark = pytest.mark.integration

HUB_SPEC = "hf-hub:google/vit-base-patch16-224-in21k"  # the embedded default
BOUND_S = 30.0  # measured here: ~3 s refused or offline, ~6 s against a silent endpoint (timeout 2 s)


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """A Hub that accepts connections and never answers: listening, never accepting."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def failed_start(tmp: Path, monkeypatch: pytest.MonkeyPatch, hub: dict[str, str], **settings: object):
    """Start vpt-serve with `hub` as the HF_* environment; wait for it to exit; (status, log, seconds)."""
    for name in ("HF_ENDPOINT", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_ETAG_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp / "hf-cache"))  # empty: nothing cached
    for name, value in hub.items():
        monkeypatch.setenv(name, value)
    start = time.monotonic()
    server = ServerProcess(tmp, **settings)
    try:
        status = server.proc.wait(timeout=2 * BOUND_S)
    except subprocess.TimeoutExpired:
        server.stop()
        pytest.fail(f"vpt-serve still running after {2 * BOUND_S} s:\n{server.log()}")
    elapsed = time.monotonic() - start
    server.stop()
    return status, server.log(), elapsed


def assert_one_clear_error(status: int, log: str, elapsed: float, spec: str) -> None:
    assert status == EXIT_BACKBONE_UNAVAILABLE, log
    assert "Traceback" not in log, log
    assert elapsed < BOUND_S, f"{elapsed:.1f} s:\n{log}"
    (line,) = [x for x in log.splitlines() if x.startswith("vpt-serve: error:")]
    assert f"cannot load the backbone {spec}:" in line
    assert "VPT_BACKBONE" in log and "local checkpoint" in log and "random:<preset>" in log
    assert all(name in log for name in PRESETS), log
    assert "docs/troubleshooting.md" in log


@pytest.mark.parametrize("hub", ["refused", "silent", "offline"])
def test_unreachable_hub_is_one_clear_error(hub, tmp_path, monkeypatch, silent_endpoint):
    env = {
        "refused": {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"},
        "silent": {"HF_ENDPOINT": silent_endpoint, "HF_HUB_ETAG_TIMEOUT": "2"},
        "offline": {"HF_HUB_OFFLINE": "1"},
    }[hub]
    status, log, elapsed = failed_start(tmp_path, monkeypatch, env, backbone=HUB_SPEC)
    assert_one_clear_error(status, log, elapsed, HUB_SPEC)
    why = {
        "refused": "is out of reach (",
        "silent": "did not answer within 2 s",
        "offline": "HF_HUB_OFFLINE is set",
    }[hub]
    assert why in log and "the local cache" in log and str(tmp_path / "hf-cache") in log


def test_missing_checkpoint_path_is_the_same_clear_error(tmp_path, monkeypatch):
    spec = str(tmp_path / "models" / "imagenet21k_ViT-B_16.npz")
    status, log, elapsed = failed_start(tmp_path, monkeypatch, {}, backbone=spec)
    assert_one_clear_error(status, log, elapsed, spec)
    assert "no such file or directory" in log


def test_debug_level_shows_the_traceback(tmp_path, monkeypatch):
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    status, log, _ = failed_start(tmp_path, monkeypatch, env, backbone=HUB_SPEC, log_level="debug")
    assert status == EXIT_BACKBONE_UNAVAILABLE, log
    assert "Traceback" in log and "vpt.hub.BackboneUnavailable" in log
    assert "vpt-serve: error: cannot load the backbone" in log  # and the message too
