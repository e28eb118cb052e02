"""The store contract: one suite, run unchanged against the local and the S3 backend (conftest `store`).

Covers issue B's list: put/get/info/list/delete/rollback/retention, ids and namespaces, typed errors,
validation before storage, integrity checks on read, and persistence across store instances.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from typing import Any

import pytest

from prompt_store.artifact import ArtifactError, load_artifact
from prompt_store.base import (
    CorruptArtifact,
    InvalidArtifact,
    InvalidId,
    NotFound,
    PromptStore,
    StoreError,
    TaskInfo,
    VersionInfo,
)
from prompt_store.ids import listing_key
from prompt_store.manifest import version_name

Make = Callable[..., bytes]


# ------------------------------------------------------------------------------------ round trips
def test_put_get_round_trip(store: PromptStore, make_artifact: Make) -> None:
    data = make_artifact(1)
    info = store.put("acme", "cats", data)
    assert isinstance(info, VersionInfo)
    assert info.version == 1
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert info.size == len(data)
    got, got_info = store.get("acme", "cats")
    assert got == data
    assert got_info == info
    assert store.current_version("acme", "cats") == 1
    load_artifact(got)


def test_versions_increase_and_old_versions_stay_readable(store: PromptStore, make_artifact: Make) -> None:
    blobs = [make_artifact(i) for i in range(3)]
    infos = [store.put("acme", "cats", b) for b in blobs]
    assert [i.version for i in infos] == [1, 2, 3]
    assert infos[0].created <= infos[1].created <= infos[2].created
    assert store.current_version("acme", "cats") == 3
    assert store.get("acme", "cats")[0] == blobs[2]
    for blob, info in zip(blobs, infos, strict=True):
        data, got = store.get("acme", "cats", info.version)
        assert data == blob and got == info


def test_put_accepts_bytearray_and_memoryview(store: PromptStore, make_artifact: Make) -> None:
    data = make_artifact(2)
    store.put("acme", "a", bytearray(data))
    store.put("acme", "a", memoryview(data))
    assert store.get("acme", "a", 1)[0] == store.get("acme", "a", 2)[0] == data


def test_info_reports_versions_and_metadata(store: PromptStore, make_artifact: Make) -> None:
    store.put("acme", "birds", make_artifact(1, num_classes=3))
    deep = make_artifact(2, num_classes=5, prompt_length=4, mode="deep", depth=2, name="Birds v2")
    v2 = store.put("acme", "birds", deep)
    info = store.info("acme", "birds")
    assert isinstance(info, TaskInfo)
    assert (info.tenant, info.task_id) == ("acme", "birds")
    assert info.current == v2 and info.current_version == 2
    assert [v.version for v in info.versions] == [1, 2]
    meta = info.metadata
    assert meta.mode == "deep"
    assert meta.num_classes == 5
    assert meta.labels == [f"class-2-{i}" for i in range(5)]
    assert meta.prompt_shape == (2, 4, 8)
    assert meta.embed_dim == 8
    assert meta.name == "Birds v2"
    assert meta.backbone_fingerprint == "sha256:test-backbone"
    assert meta.file_size == len(deep)


def test_info_reads_no_tensor_data(store_spec: Any, store: PromptStore, make_artifact: Make) -> None:
    """Metadata comes from the manifest: with the version's bytes cut to 100 (no tensor left, not even
    the whole header), `info` answers as before while `get` reports the damage."""
    data = make_artifact(4, num_classes=6)
    store.put("acme", "owls", data)
    before = store.info("acme", "owls")
    store_spec.overwrite_version("acme", "owls", 1, data[:100])
    assert store.info("acme", "owls") == before and before.metadata.num_classes == 6
    with pytest.raises(CorruptArtifact):
        store.get("acme", "owls")


def test_store_reopens_with_same_content(store_spec: Any, make_artifact: Make) -> None:
    first = store_spec.open()
    data = make_artifact(3)
    first.put("acme", "cats", data)
    first.close()
    second = store_spec.open()
    assert second.get("acme", "cats")[0] == data
    assert second.put("acme", "cats", make_artifact(4)).version == 2
    second.close()


def test_two_instances_see_each_others_writes(store_spec: Any, make_artifact: Make) -> None:
    a, b = store_spec.open(), store_spec.open()
    a.put("acme", "cats", make_artifact(1))
    assert b.current_version("acme", "cats") == 1
    b.put("acme", "cats", make_artifact(2))
    assert a.current_version("acme", "cats") == 2
    assert a.info("acme", "cats").current_version == 2
    a.close()
    b.close()


def test_layout_matches_docs(store_spec: Any, store: PromptStore, make_artifact: Make) -> None:
    store.put("acme", "cats", make_artifact(1))
    store.put("acme", "cats", make_artifact(2))
    names = store_spec.raw_names("acme", "cats")
    assert {"manifest.json", version_name(1), version_name(2)} <= names
    assert version_name(2) == "v000002.safetensors"


# ------------------------------------------------------------------------------ rollback, retention
def test_set_current_rolls_back_and_next_put_continues_numbering(
    store: PromptStore, make_artifact: Make
) -> None:
    blobs = [make_artifact(i) for i in range(3)]
    for b in blobs:
        store.put("acme", "cats", b)
    rolled = store.set_current("acme", "cats", 1)
    assert rolled.version == 1
    assert store.current_version("acme", "cats") == 1
    assert store.get("acme", "cats")[0] == blobs[0]
    info = store.info("acme", "cats")
    assert info.current_version == 1
    assert info.metadata.labels == [f"class-0-{i}" for i in range(3)]  # metadata follows the pointer
    assert [v.version for v in info.versions] == [1, 2, 3]
    assert store.put("acme", "cats", make_artifact(9)).version == 4  # never reuses 2 or 3
    assert store.set_current("acme", "cats", 3).version == 3  # roll forward to a kept version
    assert store.get("acme", "cats")[0] == blobs[2]


def test_keep_last_n_versions(store_spec: Any, make_artifact: Make) -> None:
    store = store_spec.open(keep_versions=3)
    blobs = {v: make_artifact(v) for v in range(1, 7)}
    for v in range(1, 7):
        store.put("acme", "cats", blobs[v])
    assert [v.version for v in store.info("acme", "cats").versions] == [4, 5, 6]
    for gone in (1, 2, 3):
        with pytest.raises(NotFound) as exc:
            store.get("acme", "cats", gone)
        assert exc.value.version == gone
        with pytest.raises(NotFound):
            store.set_current("acme", "cats", gone)
    assert store.get("acme", "cats", 4)[0] == blobs[4]
    # Pruned data is gone from storage too, not just from the manifest.
    names = store_spec.raw_names("acme", "cats")
    assert sorted(n for n in names if n.endswith(".safetensors")) == [version_name(v) for v in (4, 5, 6)]
    store.close()


def test_retention_never_drops_the_current_version(store_spec: Any, make_artifact: Make) -> None:
    store = store_spec.open(keep_versions=2)
    for v in range(1, 4):
        store.put("acme", "cats", make_artifact(v))
    store.set_current("acme", "cats", 2)  # current is now the oldest retained version
    # A store opened with a smaller window must still keep the current version it did not create.
    tight = store_spec.open(keep_versions=1)
    assert tight.get("acme", "cats")[1].version == 2
    assert [v.version for v in tight.info("acme", "cats").versions] == [2, 3]
    v4 = tight.put("acme", "cats", make_artifact(4))
    assert [v.version for v in tight.info("acme", "cats").versions] == [4]
    assert tight.get("acme", "cats")[1] == v4
    store.close()
    tight.close()


def test_keep_versions_must_be_positive(store_spec: Any) -> None:
    with pytest.raises(ValueError):
        store_spec.open(keep_versions=0)


# -------------------------------------------------------------------------------------- deletion
def test_delete_removes_task_and_data(store_spec: Any, store: PromptStore, make_artifact: Make) -> None:
    store.put("acme", "cats", make_artifact(1))
    store.put("acme", "cats", make_artifact(2))
    store.put("acme", "dogs", make_artifact(3))
    store.delete("acme", "cats")
    for call in (
        lambda: store.get("acme", "cats"),
        lambda: store.get("acme", "cats", 1),
        lambda: store.info("acme", "cats"),
        lambda: store.current_version("acme", "cats"),
        lambda: store.set_current("acme", "cats", 1),
        lambda: store.delete("acme", "cats"),
    ):
        with pytest.raises(NotFound):
            call()
    assert [t.task_id for t in store.list_tasks("acme").items] == ["dogs"]
    assert not any(n.endswith(".safetensors") for n in store_spec.raw_names("acme", "cats"))
    assert store.get("acme", "dogs")[1].version == 1  # neighbours untouched


def test_recreated_task_continues_version_numbers(store: PromptStore, make_artifact: Make) -> None:
    store.put("acme", "cats", make_artifact(1))
    store.put("acme", "cats", make_artifact(2))
    store.delete("acme", "cats")
    again = store.put("acme", "cats", make_artifact(3))
    assert again.version == 3  # a replica's cached "v2" can never be mistaken for the new task
    info = store.info("acme", "cats")
    assert [v.version for v in info.versions] == [3]


# ---------------------------------------------------------------------------------------- listing
def test_list_tasks_paginates_in_listing_order(store: PromptStore, make_artifact: Make) -> None:
    ids = ["b0", "a", "a-b", "a_b", "a.c", "a0", "zz", "m"]
    data = make_artifact(1)
    for task_id in ids:
        store.put("acme", task_id, data)
    store.put("other", "zzz", data)
    store.put("acme", "gone", data)
    store.delete("acme", "gone")
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = store.list_tasks("acme", limit=3, cursor=cursor)
        assert len(page.items) <= 3
        seen += [t.task_id for t in page.items]
        pages += 1
        cursor = page.next_cursor
        if cursor is None:
            break
        assert pages < 10
    assert seen == sorted(ids, key=listing_key)
    assert seen[:3] == ["a-b", "a.c", "a"]  # S3 key order: "-" < "." < "/" < "0" < "_"
    assert pages >= 3
    item = store.list_tasks("acme", limit=1).items[0]
    assert item.current_version == 1 and item.metadata.num_classes == 3


def test_list_tasks_empty_and_bad_arguments(store: PromptStore) -> None:
    page = store.list_tasks("nobody")
    assert page.items == () and page.next_cursor is None
    with pytest.raises(InvalidId):
        store.list_tasks("acme", cursor="../x")
    with pytest.raises(ValueError):
        store.list_tasks("acme", limit=0)


def test_tenants_lists_only_tenants_with_live_tasks(store: PromptStore, make_artifact: Make) -> None:
    assert store.tenants() == []
    data = make_artifact(1)
    store.put("zeta", "t", data)
    store.put("acme", "t", data)
    store.put("gone", "t", data)
    store.delete("gone", "t")
    assert store.tenants() == ["acme", "zeta"]


def test_tenants_are_isolated(store: PromptStore, make_artifact: Make) -> None:
    a, b = make_artifact(1), make_artifact(2)
    store.put("acme", "cats", a)
    store.put("globex", "cats", b)
    store.put("globex", "cats", b)
    assert store.get("acme", "cats")[0] == a
    assert store.current_version("acme", "cats") == 1
    assert store.current_version("globex", "cats") == 2
    store.delete("globex", "cats")
    assert store.get("acme", "cats")[0] == a
    with pytest.raises(NotFound):
        store.get("globex", "cats")


# ------------------------------------------------------------------------------------- bad input
BAD_IDS = [
    "",
    ".",
    "..",
    "../x",
    "a/b",
    "a\\b",
    "x" * 300,
    "x" * 65,
    "caf\u00e9",
    "\u0430pple",  # Cyrillic a
    "\uff41",  # fullwidth a
    "Cats",
    "-a",
    "_a",
    ".hidden",
    " a",
    "a ",
    "a\n",
    "a\x00b",
    "a:b",
    "a%2fb",
]
GOOD_IDS = ["a", "0", "x" * 64, "a.b_c-d", "v1.2", "9lives"]


@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
def test_invalid_ids_are_refused_everywhere(store: PromptStore, make_artifact: Make, bad: str) -> None:
    data = make_artifact(1)
    store.put("acme", "ok", data)
    calls: list[Callable[[], object]] = [
        lambda: store.put("acme", bad, data),
        lambda: store.put(bad, "ok", data),
        lambda: store.get("acme", bad),
        lambda: store.get(bad, "ok"),
        lambda: store.info("acme", bad),
        lambda: store.current_version(bad, "ok"),
        lambda: store.delete("acme", bad),
        lambda: store.set_current(bad, "ok", 1),
        lambda: store.list_tasks(bad),
    ]
    for call in calls:
        with pytest.raises(InvalidId):
            call()
    assert store.tenants() == ["acme"]
    assert [t.task_id for t in store.list_tasks("acme").items] == ["ok"]


@pytest.mark.parametrize("good", GOOD_IDS)
def test_valid_ids_are_accepted(store: PromptStore, make_artifact: Make, good: str) -> None:
    data = make_artifact(1)
    store.put(good, good, data)
    assert store.get(good, good)[0] == data
    assert store.tenants() == [good]


def test_non_string_ids_are_refused(store: PromptStore, make_artifact: Make) -> None:
    with pytest.raises(InvalidId):
        store.put("acme", 7, make_artifact(1))  # type: ignore[arg-type]
    with pytest.raises(InvalidId):
        store.get(None, "x")  # type: ignore[arg-type]


def test_unknown_task_and_version_are_not_found(store: PromptStore, make_artifact: Make) -> None:
    for call in (
        lambda: store.get("acme", "nope"),
        lambda: store.info("acme", "nope"),
        lambda: store.current_version("acme", "nope"),
        lambda: store.delete("acme", "nope"),
        lambda: store.set_current("acme", "nope", 1),
    ):
        with pytest.raises(NotFound) as exc:
            call()
        assert (exc.value.tenant, exc.value.task_id, exc.value.version) == ("acme", "nope", None)
    store.put("acme", "cats", make_artifact(1))
    for version in (2, 99, 0, -1):
        with pytest.raises(NotFound) as exc:
            store.get("acme", "cats", version)
        assert exc.value.version == version
        with pytest.raises(NotFound):
            store.set_current("acme", "cats", version)
    assert issubclass(NotFound, StoreError) and issubclass(NotFound, LookupError)


def _with_nan_in_bias(data: bytes) -> bytes:
    # head.bias is the last tensor written (F32): overwrite its last value with a NaN bit pattern.
    return data[:-4] + struct.pack("<f", float("nan"))


INVALID_ARTIFACTS: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "empty": (lambda d: b"", "file"),
    "garbage": (lambda d: b"not a safetensors file at all", "header"),
    "truncated": (lambda d: d[:-10], "file"),
    "trailing-bytes": (lambda d: d + b"\0" * 8, "file"),
    "nan-in-bias": (_with_nan_in_bias, "head.bias"),
}


@pytest.mark.parametrize("kind", sorted(INVALID_ARTIFACTS))
def test_invalid_artifact_is_never_stored(
    store_spec: Any, store: PromptStore, make_artifact: Make, kind: str
) -> None:
    mangle, field = INVALID_ARTIFACTS[kind]
    good = make_artifact(1)
    bad = mangle(good)
    with pytest.raises(ArtifactError):
        load_artifact(bad)  # the premise: the format itself refuses it
    # Unknown task: nothing at all may appear.
    with pytest.raises(InvalidArtifact) as exc:
        store.put("acme", "fresh", bad)
    assert exc.value.field == field
    assert isinstance(exc.value.__cause__, ArtifactError)
    with pytest.raises(NotFound):
        store.info("acme", "fresh")
    assert store.list_tasks("acme").items == ()
    assert store_spec.raw_names("acme", "fresh") == set()  # validated before anything is created
    # Existing task: current version, version list and stored files unchanged.
    store.put("acme", "cats", good)
    before = (store.info("acme", "cats"), store_spec.raw_names("acme", "cats"))
    with pytest.raises(InvalidArtifact):
        store.put("acme", "cats", bad)
    assert (store.info("acme", "cats"), store_spec.raw_names("acme", "cats")) == before
    assert store.get("acme", "cats")[0] == good


def test_validator_refusal_is_never_stored(store: PromptStore, make_artifact: Make) -> None:
    calls: list[bytes] = []

    def wrong_backbone(data: bytes) -> None:
        calls.append(data)
        raise ArtifactError("backbone_fingerprint", "trained on another backbone")

    data = make_artifact(1)
    with pytest.raises(InvalidArtifact) as exc:
        store.put("acme", "cats", data, validator=wrong_backbone)
    assert exc.value.field == "backbone_fingerprint"
    assert calls == [data]
    with pytest.raises(NotFound):
        store.get("acme", "cats")
    accepted: list[int] = []
    info = store.put("acme", "cats", data, validator=lambda d: accepted.append(len(d)))
    assert info.version == 1 and accepted == [len(data)]


def test_limits_apply_on_upload(store_spec: Any, make_artifact: Make) -> None:
    from prompt_store.artifact import ArtifactLimits

    store = store_spec.open(limits=ArtifactLimits(max_classes=4))
    store.put("acme", "small", make_artifact(1, num_classes=4))
    with pytest.raises(InvalidArtifact) as exc:
        store.put("acme", "big", make_artifact(1, num_classes=5))
    assert exc.value.field == "head.weight"
    with pytest.raises(NotFound):
        store.info("acme", "big")
    store.close()


# ------------------------------------------------------------------------------------- integrity
def test_corrupted_version_is_detected_on_read(
    store_spec: Any, store: PromptStore, make_artifact: Make
) -> None:
    good = make_artifact(1)
    store.put("acme", "cats", good)
    store.put("acme", "cats", make_artifact(2))
    flipped = bytearray(good)
    flipped[-1] ^= 0x01  # one bit in the last tensor value: still a loadable artifact
    load_artifact(bytes(flipped))
    store_spec.overwrite_version("acme", "cats", 1, bytes(flipped))
    with pytest.raises(CorruptArtifact):
        store.get("acme", "cats", 1)
    with pytest.raises(CorruptArtifact):
        store.set_current("acme", "cats", 1)  # a rollback must not switch to damaged data
    assert store.current_version("acme", "cats") == 2
    store_spec.overwrite_version("acme", "cats", 2, good[:100])
    with pytest.raises(CorruptArtifact):
        store.get("acme", "cats")


def test_errors_are_typed() -> None:
    from prompt_store.base import Conflict, StoreUnavailable

    for cls in (InvalidId, NotFound, InvalidArtifact, CorruptArtifact, StoreUnavailable, Conflict):
        assert issubclass(cls, StoreError)
    err = InvalidArtifact("labels", "has 2 entries")
    assert err.field == "labels" and "labels" in str(err)
    import pickle

    assert pickle.loads(pickle.dumps(err)).field == "labels"
