"""The engine process (server/engine/process.py): a real child process on shared memory.

Same results as the in-process engine (and batch-invariant), installs made after it started reach it,
a failing batch fails alone, its death fails what was in flight and turns `alive` off, and too little
shared memory stops the start with the fixes in the message.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from server.app import create_app
from server.engine.bank import TaskKey
from server.engine.batch import EngineBatch
from server.engine.process import EngineProcessDied, EngineStartError, ProcessConfig, check_shared_memory
from tests.server.helpers import BACKBONE_SPEC, artifact_bytes, make_artifact, png_bytes
from tests.server.server_proc import ServerProcess, children, engine_pid
from tests.server.test_engine import TASKS, make_engine, run
from tests.server.test_faults import OCTET, assert_error, classify
from tests.server.test_faults import settings as fault_settings
from tests.server.test_integration import upload
from vpt.config import get_preset
from vpt.fingerprint import backbone_fingerprint
from vpt.hub import Backbone, load_backbone
from vpt.vit import VisionTransformer


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(BACKBONE_SPEC)


@pytest.fixture
def pair(backbone):
    """(in-process engine, engine-process engine) over the same backbone, the same tasks installed in
    the same order (so the same slots), both after the process started."""
    local = make_engine(backbone)
    remote = make_engine(load_backbone(BACKBONE_SPEC), process=ProcessConfig(max_batch_size=16))
    remote.warmup((1, 4))
    for i, (P, m, C) in enumerate(TASKS):
        art = make_artifact(backbone, P=P, mode=m, C=C, seed=i)
        assert local.install(TaskKey("t", f"task{i}", 1), art) == remote.install(
            TaskKey("t", f"task{i}", 1), art
        )
    yield local, remote
    remote.close()


ORDER = [0, 1, 2, 3, 4, 3, 2, 1, 0, 4, 2]


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def test_same_results_as_in_process_and_batch_invariant(pair):
    local, remote = pair
    x = images(len(ORDER))
    slots = [local.bank.lookup(TaskKey("t", f"task{i}", 1)) for i in ORDER]
    for output in ("classify", "embed"):
        a, b = run(local, x, slots, output), run(remote, x, slots, output)
        if output == "embed":
            torch.testing.assert_close(b.features, a.features, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(b.indices, a.indices)
            torch.testing.assert_close(b.scores, a.scores, rtol=1e-6, atol=1e-7)
    mixed = run(remote, x, slots, "embed")
    for i, s in enumerate(slots):  # each sample as it would be alone
        solo = run(remote, x[i : i + 1], [s], "embed")
        torch.testing.assert_close(mixed.features[i], solo.features[0], rtol=1e-5, atol=1e-6)


def test_a_slot_rewritten_after_start_is_read_anew(backbone):
    """One slot: task a, then (a evicted) task b in the same slot; the engine process reads b."""
    local = make_engine(backbone, slots=1)
    remote = make_engine(load_backbone(BACKBONE_SPEC), slots=1, process=ProcessConfig(max_batch_size=4))
    try:
        x = images(2, seed=3)
        for name, seed in (("a", 1), ("b", 2)):
            art = make_artifact(backbone, P=5, mode="deep", C=4, seed=seed)
            slot = local.install(TaskKey("t", name, 1), art)
            assert remote.install(TaskKey("t", name, 1), art) == slot == 0
            torch.testing.assert_close(
                run(remote, x, [slot, slot], "embed").features, run(local, x, [slot, slot], "embed").features
            )
    finally:
        remote.close()


def test_a_failing_batch_fails_alone(pair):
    _, remote = pair
    good = [remote.bank.lookup(TaskKey("t", "task0", 1))]
    info = remote.bank.info(good[0])
    with pytest.raises(RuntimeError, match="IndexError"):  # a slot past the bank: raised in the child
        remote.run(EngineBatch(images(1), [10_000], [info], "classify", 3))
    assert remote.alive
    assert run(remote, images(1), good).indices.shape == (1, 3)


def test_preemptible_batch_runs_a_handed_over_batch_between_its_blocks(pair):
    """An overtaker handed over behind a preemptible batch finishes first, with its solo result."""
    local, remote = pair
    s0, s1 = (remote.bank.lookup(TaskKey("t", f"task{i}", 1)) for i in (0, 1))
    big, one = images(16, seed=5), images(1, seed=6)
    assert remote.in_child_process and local.cfg.depth >= 2  # a block boundary to run it at
    pid = remote.executor.process._proc.pid  # type: ignore[attr-defined]
    os.kill(pid, signal.SIGSTOP)  # both are queued before the heavy batch starts: no race
    try:
        heavy = remote.submit(EngineBatch(big, [s0] * 16, [remote.bank.info(s0)] * 16, "classify", 3), True)
        light = remote.preempt(EngineBatch(one, [s1], [remote.bank.info(s1)], "classify", 5))
        done: list[str] = []
        light.add_done_callback(lambda _: done.append("light"))
        heavy.add_done_callback(lambda _: done.append("heavy"))
    finally:
        os.kill(pid, signal.SIGCONT)
    heavy.result(timeout=30)
    light_result = light.result(timeout=30)
    assert done == ["light", "heavy"]
    alone = run(local, one, [s1], top_k=5)
    assert torch.equal(light_result.indices, alone.indices)
    torch.testing.assert_close(light_result.scores, alone.scores, rtol=1e-6, atol=1e-7)


def test_death_fails_what_is_in_flight_and_turns_alive_off(backbone):
    engine = make_engine(load_backbone(BACKBONE_SPEC), process=ProcessConfig(max_batch_size=4))
    engine.warmup((1,))
    slot = engine.install(TaskKey("t", "x", 1), make_artifact(backbone, P=4, mode="deep", C=3, seed=0))
    batch = EngineBatch(images(4), [slot] * 4, [engine.bank.info(slot)] * 4, "classify", 3)
    assert engine.in_child_process
    pid = engine.executor.process._proc.pid  # type: ignore[attr-defined]
    os.kill(pid, signal.SIGSTOP)  # stopped: the batches below are certainly still in flight
    pending = [engine.submit(batch) for _ in range(2)]  # both lanes
    os.kill(pid, signal.SIGKILL)
    for p in pending:
        with pytest.raises(EngineProcessDied):
            p.result()
    deadline = time.monotonic() + 10
    while engine.alive and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine.alive and not engine.ready
    with pytest.raises(EngineProcessDied):
        engine.run(batch)
    engine.close()


def test_too_little_shared_memory_is_refused_with_the_fixes(tmp_path):
    st = os.statvfs(tmp_path)
    free = st.f_bavail * st.f_frsize
    check_shared_memory(1, str(tmp_path))
    with pytest.raises(EngineStartError) as e:
        check_shared_memory(free + 2**40, str(tmp_path))
    for fix in ("--shm-size", "shm_size", "VPT_BANK_BYTES", "VPT_ENGINE_PROCESS=false"):
        assert fix in str(e.value)


def test_a_bank_beyond_shared_memory_is_refused_before_it_is_allocated(backbone):
    """Checked up front: touching shared memory past /dev/shm's size would be a SIGBUS, not an error."""
    with pytest.raises(EngineStartError, match="VPT_ENGINE_PROCESS=false"):
        make_engine(backbone, slots=2**40, bank_bytes=2**60, process=ProcessConfig(max_batch_size=4))


def small_shm_available() -> bool:
    cmd = ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"]
    try:
        return subprocess.run(cmd, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.integration
@pytest.mark.skipif(not small_shm_available(), reason="needs unshare -rm (user and mount namespaces)")
def test_server_without_enough_shared_memory_computes_in_process_and_says_how_to_fix_it(tmp_path, backbone):
    """A container's small /dev/shm (1 MiB here, in a mount namespace of its own): the server still
    serves, from its own process, and its log names the fixes."""
    shell = f"mount -t tmpfs -o size=1m tmpfs /dev/shm && exec {sys.executable} -m server"
    proc = ServerProcess(tmp_path, command=["unshare", "-rm", "sh", "-c", shell], backbone=BACKBONE_SPEC)
    proc.wait_ready()
    try:
        assert not [
            c for c in children(proc.proc.pid) if b"forkserver" in Path(f"/proc/{c}/cmdline").read_bytes()
        ]
        upload(proc.url, "t", artifact_bytes(backbone, P=2, mode="deep", C=3, seed=0))
        files = [("images", ("0.png", png_bytes(0)))]
        assert httpx.post(f"{proc.url}/v1/tasks/t/classify", files=files).status_code == 200
    finally:
        assert proc.stop() == 0, proc.log()[-3000:]
    assert "--shm-size" in proc.log() and "Computing in the server process instead" in proc.log()


def test_a_deep_backbone_crosses_as_one_buffer():
    """~500 weight tensors: one shared buffer, where one descriptor per tensor would pass the fork
    server's limit (~250); the engine process computes what the in-process engine does."""
    cfg = dataclasses.replace(get_preset("vit_test_tiny"), depth=40)

    def backbone() -> Backbone:
        model = (
            VisionTransformer(cfg).init_random(torch.Generator().manual_seed(0)).eval().requires_grad_(False)
        )
        return Backbone(
            model, cfg, backbone_fingerprint(model.state_dict()), "random:depth40", "random:depth40"
        )

    local, remote = make_engine(backbone()), make_engine(backbone(), process=ProcessConfig(max_batch_size=2))
    try:
        assert len(remote.model.state_dict()) > 300
        art = make_artifact(local.backbone, P=3, mode="deep", C=4, seed=0)
        slot = local.install(TaskKey("t", "x", 1), art)
        assert remote.install(TaskKey("t", "x", 1), art) == slot
        x = images(2)
        torch.testing.assert_close(
            run(remote, x, [slot, slot], "embed").features, run(local, x, [slot, slot], "embed").features
        )
    finally:
        remote.close()


# ------------------------------------------------------------------- a real vpt-serve with its engine process


def gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return not Path(f"/proc/{pid}").exists()


def test_embedded_app_whose_engine_process_dies_fails_liveness_and_answers_503(tmp_path, backbone):
    """In an embedded app (no `vpt-serve` to exit) the server keeps answering: 503s, /healthz 503."""
    app = create_app(fault_settings(tmp_path))
    with TestClient(app) as client:
        assert client.put("/v1/tasks/t", content=artifact_bytes(backbone, P=2, mode="deep", C=3, seed=0),
                          headers=OCTET).status_code == 201  # fmt: skip
        assert classify(client, "t").status_code == 200
        engine = app.state.services.core.engine
        assert engine.in_child_process and client.get("/healthz").json() == {"status": "ok"}
        process = engine.executor.process
        os.kill(process._proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while client.get("/healthz").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        health = client.get("/healthz")
        assert (health.status_code, health.json()) == (503, {"status": "engine process exited"})
        assert client.get("/readyz").status_code == 503
        assert_error(classify(client, "t"), 503, "unavailable", "inference failed")


@pytest.mark.integration
def test_vpt_serve_whose_engine_process_dies_exits_1_for_its_supervisor(tmp_path, backbone):
    proc = ServerProcess(tmp_path, backbone=BACKBONE_SPEC).wait_ready()
    try:
        upload(proc.url, "t", artifact_bytes(backbone, P=2, mode="deep", C=3, seed=0))
        files = [("images", ("0.png", png_bytes(0)))]
        assert httpx.post(f"{proc.url}/v1/tasks/t/classify", files=files).status_code == 200
        os.kill(engine_pid(proc.proc.pid), signal.SIGKILL)
        assert proc.proc.wait(timeout=30) == 1
    finally:
        proc.stop()
    assert "the engine process exited" in proc.log()


@pytest.mark.integration
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_the_engine_process_never_outlives_its_server(tmp_path, how):
    """SIGTERM: the server drains, then stops its engine process; SIGKILL: the engine process sees its
    pipe close and exits on its own."""
    proc = ServerProcess(tmp_path, backbone=BACKBONE_SPEC).wait_ready()
    child = engine_pid(proc.proc.pid)
    if how == "SIGTERM":
        assert proc.stop() == 0, proc.log()[-3000:]
    else:
        proc.proc.kill()
        proc.stop()
    assert gone(child)
