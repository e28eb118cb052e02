"""Local-backend specifics: the write protocol's fsync/rename order, locking, crash leftovers, errors."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from prompt_store.base import Conflict, CorruptArtifact, NotFound, StoreUnavailable
from prompt_store.local import LocalStore

Make = Callable[..., bytes]


def task_dir(root: Path, tenant: str = "acme", task: str = "cats") -> Path:
    return root / "tenants" / tenant / "tasks" / task


def test_write_protocol_order(tmp_path: Path, make_artifact: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    """Version file: fsync, rename, dir fsync — and only then the manifest: fsync, rename, dir fsync."""
    store = LocalStore(tmp_path / "s")
    store.put("acme", "cats", make_artifact(0))  # directories exist; now record a plain second put
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append(("rename", f"{os.path.basename(src)[:5]}->{os.path.basename(dst)}"))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    store.put("acme", "cats", make_artifact(1))
    monkeypatch.undo()
    assert events == [
        ("fsync", events[0][1]),  # the temp file holding the new version
        ("rename", ".tmp-->v000002.safetensors"),
        ("fsync", "cats"),  # the directory entry of v000002 is durable ...
        ("fsync", events[3][1]),  # ... before the manifest is even written
        ("rename", ".tmp-->manifest.json"),
        ("fsync", "cats"),
    ]
    assert events[0][1].startswith(".tmp-") and events[3][1].startswith(".tmp-")


def test_manifest_is_plain_json(tmp_path: Path, make_artifact: Make) -> None:
    store = LocalStore(tmp_path / "s", keep_versions=2)
    for i in range(3):
        store.put("acme", "cats", make_artifact(i))
    doc = json.loads((task_dir(tmp_path / "s") / "manifest.json").read_text())
    assert doc["manifest"] == 1
    assert (doc["current"], doc["last_version"]) == (3, 3)
    assert [v["version"] for v in doc["versions"]] == [2, 3]
    assert json.loads(doc["header"])["__metadata__"]["format"] == "vpt-task/1"


@pytest.fixture
def held_lock(tmp_path: Path, make_artifact: Make) -> Iterator[LocalStore]:
    """A store whose task acme/cats is locked by another open file description (as another process)."""
    store = LocalStore(tmp_path / "s", lock_timeout=0.3)
    store.put("acme", "cats", make_artifact(0))
    fd = os.open(task_dir(tmp_path / "s") / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield store
    finally:
        os.close(fd)


def test_writer_times_out_on_a_held_lock_but_readers_do_not_wait(
    held_lock: LocalStore, make_artifact: Make
) -> None:
    started = time.monotonic()
    with pytest.raises(Conflict):
        held_lock.put("acme", "cats", make_artifact(1))
    assert 0.3 <= time.monotonic() - started < 2.0
    with pytest.raises(Conflict):
        held_lock.set_current("acme", "cats", 1)
    with pytest.raises(Conflict):
        held_lock.delete("acme", "cats")
    started = time.monotonic()
    assert held_lock.get("acme", "cats")[1].version == 1  # lock-free read
    assert held_lock.info("acme", "cats").current_version == 1
    assert time.monotonic() - started < 0.3
    held_lock.put("acme", "dogs", make_artifact(2))  # other tasks are not blocked


def test_waiting_writer_proceeds_when_the_lock_is_released(tmp_path: Path, make_artifact: Make) -> None:
    store = LocalStore(tmp_path / "s", lock_timeout=10)
    store.put("acme", "cats", make_artifact(0))
    fd = os.open(task_dir(tmp_path / "s") / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    threading.Timer(0.2, os.close, args=(fd,)).start()
    started = time.monotonic()
    assert store.put("acme", "cats", make_artifact(1)).version == 2
    assert 0.15 <= time.monotonic() - started < 5


def test_crash_leftovers_are_invisible_and_cleaned_by_the_next_writer(
    tmp_path: Path, make_artifact: Make
) -> None:
    root = tmp_path / "s"
    store = LocalStore(root)
    v1 = make_artifact(1)
    store.put("acme", "cats", v1)
    d = task_dir(root)
    # What a writer killed mid-put leaves: a half-written temp file and a renamed but uncommitted version.
    (d / ".tmp-deadbeef").write_bytes(v1[:50])
    (d / "v000002.safetensors").write_bytes(make_artifact(2))
    reopened = LocalStore(root)
    assert reopened.current_version("acme", "cats") == 1
    assert [v.version for v in reopened.info("acme", "cats").versions] == [1]
    assert reopened.get("acme", "cats")[0] == v1
    new = make_artifact(3)
    assert reopened.put("acme", "cats", new).version == 2  # the uncommitted number is free again
    assert reopened.get("acme", "cats")[0] == new
    assert sorted(os.listdir(d)) == [".lock", "manifest.json", "v000001.safetensors", "v000002.safetensors"]


def test_sweep_reports_and_removes_garbage(tmp_path: Path, make_artifact: Make) -> None:
    root = tmp_path / "s"
    store = LocalStore(root)
    store.put("acme", "cats", make_artifact(1))
    store.put("other", "dogs", make_artifact(2))
    (task_dir(root) / ".tmp-1").write_bytes(b"x")
    (task_dir(root) / "v000007.safetensors").write_bytes(b"x")
    (task_dir(root, "other", "dogs") / ".tmp-2").write_bytes(b"x")
    assert store.sweep("acme") == 2
    assert store.sweep() == 1
    assert store.sweep() == 0
    assert store.get("acme", "cats")[1].version == 1


def test_foreign_entries_are_not_listed(tmp_path: Path, make_artifact: Make) -> None:
    root = tmp_path / "s"
    store = LocalStore(root)
    store.put("acme", "cats", make_artifact(1))
    (root / "tenants" / "acme" / "tasks" / "Not An Id").mkdir()
    (root / "tenants" / "acme" / "tasks" / "empty").mkdir()  # a first put that died before committing
    (root / "tenants" / ".DS_Store").write_bytes(b"")
    assert [t.task_id for t in store.list_tasks("acme").items] == ["cats"]
    assert store.tenants() == ["acme"]


def test_corrupt_manifest_is_a_typed_error(tmp_path: Path, make_artifact: Make) -> None:
    root = tmp_path / "s"
    store = LocalStore(root)
    store.put("acme", "cats", make_artifact(1))
    (task_dir(root) / "manifest.json").write_text('{"manifest": 1, "versions": [')
    with pytest.raises(CorruptArtifact):
        store.get("acme", "cats")
    with pytest.raises(CorruptArtifact):
        store.put("acme", "cats", make_artifact(2))


def test_missing_root_with_create_false(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable):
        LocalStore(tmp_path / "absent", create=False)
    LocalStore(tmp_path / "made")  # create=True (default) makes it
    LocalStore(tmp_path / "made", create=False).ping()


def test_io_errors_are_store_unavailable(tmp_path: Path, make_artifact: Make) -> None:
    root = tmp_path / "s"
    store = LocalStore(root)
    (root / "tenants" / "acme").write_bytes(b"a file where a directory belongs")
    with pytest.raises(StoreUnavailable):
        store.put("acme", "cats", make_artifact(1))
    store.ping()
    shutil.rmtree(root)  # e.g. the volume went away underneath a running server
    with pytest.raises(StoreUnavailable):
        store.ping()


@pytest.mark.parametrize("how", ["removed", "emptied", "replaced-by-file"])
def test_vanished_store_is_unavailable_and_never_recreated(
    tmp_path: Path, make_artifact: Make, how: str
) -> None:
    """The store's directory going away (unmounted volume, rm -rf) is an outage, not an empty store:
    every operation raises StoreUnavailable (not NotFound / an empty page), and no write recreates it."""
    root = tmp_path / "s"
    store = LocalStore(root)
    store.put("acme", "cats", make_artifact(0))
    shutil.rmtree(root)
    if how == "emptied":  # e.g. the mount point is left behind, empty
        root.mkdir()
    elif how == "replaced-by-file":
        root.write_bytes(b"not a directory")
    calls: dict[str, Callable[[], object]] = {
        "list": lambda: store.list_tasks("acme"),
        "list-other-tenant": lambda: store.list_tasks("beta"),
        "tenants": store.tenants,
        "get": lambda: store.get("acme", "cats"),
        "get-version": lambda: store.get("acme", "cats", 1),
        "get-never-stored": lambda: store.get("acme", "dogs"),
        "info": lambda: store.info("acme", "cats"),
        "current-version": lambda: store.current_version("acme", "cats"),
        "put": lambda: store.put("acme", "cats", make_artifact(1)),
        "put-new-tenant": lambda: store.put("beta", "dogs", make_artifact(1)),
        "delete": lambda: store.delete("acme", "cats"),
        "set-current": lambda: store.set_current("acme", "cats", 1),
        "sweep": store.sweep,
        "ping": store.ping,
    }
    for name, call in calls.items():
        with pytest.raises(StoreUnavailable):
            call()
            pytest.fail(f"{name} did not raise")
    if how == "removed":
        assert not root.exists()
    elif how == "emptied":
        assert os.listdir(root) == []
    else:
        assert root.read_bytes() == b"not a directory"


def test_missing_task_or_tenant_is_not_found_while_the_store_is_there(
    tmp_path: Path, make_artifact: Make
) -> None:
    """The counterpart: with the store present, missing tenants and tasks are NotFound / empty, and a
    new tenant's directories are created under the existing tenants directory."""
    store = LocalStore(tmp_path / "s")
    assert store.list_tasks("nobody").items == () and store.tenants() == []
    for call in (
        lambda: store.get("nobody", "cats"),
        lambda: store.info("nobody", "cats"),
        lambda: store.delete("nobody", "cats"),
        lambda: store.set_current("nobody", "cats", 1),
    ):
        with pytest.raises(NotFound):
            call()
    store.put("acme", "cats", make_artifact(0))
    shutil.rmtree(task_dir(tmp_path / "s"))  # one task's directory gone: that task is simply missing
    with pytest.raises(NotFound):
        store.get("acme", "cats")
    assert store.list_tasks("acme").items == ()
    store.put("beta", "dogs", make_artifact(1))
    assert store.tenants() == ["beta"]
