"""Task artifact format v1 (docs/artifact-format.md): round trips, every validation rule, hostile input.

Bad files are built two ways: `_raw` serialises arbitrary tensors and metadata through the container
writer, skipping the format rules (so a rule can be broken one at a time), and `_patch` edits the JSON
header of a good file byte for byte (for container-level damage: offsets, dtypes, lengths).
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import random
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from prompt_store.artifact import (
    FORMAT,
    ArtifactError,
    ArtifactLimits,
    ArtifactMetadata,
    BackboneSignature,
    TaskArtifact,
    load_artifact,
    read_artifact,
    read_metadata,
    read_metadata_file,
    save_artifact,
    validate_artifact,
    validate_for_backbone,
    write_artifact,
)
from prompt_store.artifact_header import encode

D, DEPTH, P, C = 8, 3, 4, 5
FP = "sha256:" + "ab" * 32
CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}


def make(kind: str = "shallow", dtype: torch.dtype = torch.float32, **overrides: Any) -> TaskArtifact:
    g = torch.Generator().manual_seed(0)
    layers, plen = {"shallow": (1, P), "deep": (DEPTH, P), "linear": (1, 0)}[kind]
    fields: dict[str, Any] = dict(
        prompts=torch.randn(layers, plen, D, generator=g).to(dtype),
        head_weight=torch.randn(C, D, generator=g).to(dtype),
        head_bias=torch.randn(C, generator=g).to(dtype),
        mode="deep" if kind == "deep" else "shallow",
        backbone="vit_test_tiny",
        backbone_fingerprint=FP,
        labels=[f"class {i}" for i in range(C)],
    )
    fields.update(overrides)
    return TaskArtifact(**fields)


def good_meta(**changes: str | None) -> dict[str, str]:
    meta = {
        "format": FORMAT,
        "mode": "shallow",
        "backbone": "vit_test_tiny",
        "backbone_fingerprint": FP,
        "labels": json.dumps([f"c{i}" for i in range(C)]),
    }
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    return meta


def _raw(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> bytes:
    """A safetensors file with exactly these tensors and metadata; no format rule applied."""
    records = [
        (name, CODES[t.dtype], tuple(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes())
        for name, t in tensors.items()
    ]
    return encode(records, meta)


def good_tensors(layers: int = 1, plen: int = P, classes: int = C, dim: int = D) -> dict[str, torch.Tensor]:
    return {
        "prompts": torch.zeros(layers, plen, dim),
        "head.weight": torch.zeros(classes, dim),
        "head.bias": torch.zeros(classes),
    }


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack_from("<Q", data)
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: dict[str, Any] | bytes, body: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _patch(edit: Callable[[dict[str, Any]], None], data: bytes | None = None) -> bytes:
    """A good file whose JSON header was changed by `edit` (data section untouched)."""
    header, body = _split(data if data is not None else save_artifact(make()))
    edit(header)
    return _join(header, body)


def _patch_raw(edit: Callable[[bytes], bytes]) -> bytes:
    """A good file whose raw header bytes were changed by `edit` (the length prefix follows)."""
    data = save_artifact(make())
    (n,) = struct.unpack_from("<Q", data)
    return _join(edit(data[8 : 8 + n]), data[8 + n :])


def assert_refused(data: bytes, field: str, limits: ArtifactLimits | None = None) -> ArtifactError:
    """load_artifact refuses `data` with `field`, never allocating much more than the input itself."""
    tracemalloc.start()
    try:
        with pytest.raises(ArtifactError) as info:
            load_artifact(data, limits)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.field == field, str(info.value)
    assert field in str(info.value)
    # Header copies are bounded by the header limit; a hostile length must not turn into an allocation.
    assert peak < 4 * len(data) + (4 << 20), f"peak {peak} bytes for a {len(data)}-byte input"
    return info.value


# ---------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["shallow", "deep", "linear"])
def test_round_trip(kind: str, dtype: torch.dtype) -> None:
    art = make(
        kind, train_summary={"lr": 0.25, "epochs": 3, "val": {"top1": 0.9}}, name="birds", description="é"
    )
    data = save_artifact(art, dtype)
    back = load_artifact(data)
    for got, want in (
        (back.prompts, art.prompts),
        (back.head_weight, art.head_weight),
        (back.head_bias, art.head_bias),
    ):
        assert got.dtype == dtype
        assert torch.equal(got, want.to(dtype))
    assert (back.mode, back.backbone, back.backbone_fingerprint) == (
        art.mode,
        art.backbone,
        art.backbone_fingerprint,
    )
    assert (back.labels, back.name, back.description, back.train_summary) == (
        art.labels,
        art.name,
        art.description,
        art.train_summary,
    )
    assert back.num_prompt_layers == {"shallow": 1, "deep": DEPTH, "linear": 1}[kind]
    assert back.prompt_length == (0 if kind == "linear" else P)
    assert (back.num_classes, back.embed_dim) == (C, D)
    # The reference implementation reads what we write (interop with tools that use safetensors directly).
    ref = safetensors.torch.load(data)
    assert torch.equal(ref["head.weight"], art.head_weight.to(dtype))


def test_default_dtype_is_kept_and_conversion_is_explicit() -> None:
    art = make(dtype=torch.float16)
    assert load_artifact(save_artifact(art)).prompts.dtype == torch.float16
    assert load_artifact(save_artifact(make(), torch.bfloat16)).head_bias.dtype == torch.bfloat16


def test_save_is_deterministic_and_aligned() -> None:
    a = save_artifact(make("deep", train_summary={"b": 1, "a": 2}))
    b = save_artifact(make("deep", train_summary={"a": 2, "b": 1}))
    assert a == b  # same task, same bytes: content hashes and etags are stable
    (n,) = struct.unpack_from("<Q", a)
    assert (8 + n) % 8 == 0


def test_save_accepts_non_contiguous_and_grad_tensors() -> None:
    w = torch.randn(D, C).t()  # (C, D) view with transposed strides
    assert not w.is_contiguous()
    p = torch.randn(1, P, D, requires_grad=True)
    back = load_artifact(save_artifact(make(prompts=p, head_weight=w)))
    assert torch.equal(back.head_weight, w)
    assert torch.equal(back.prompts, p.detach())


def test_mixed_dtypes_need_an_explicit_dtype() -> None:
    art = make(head_bias=torch.zeros(C, dtype=torch.float16))
    with pytest.raises(ArtifactError) as info:
        save_artifact(art)
    assert info.value.field == "head.bias"
    assert load_artifact(save_artifact(art, torch.float32)).head_bias.dtype == torch.float32


def test_save_rejects_overflow_into_inf_on_conversion() -> None:
    art = make(head_weight=torch.full((C, D), 1e6))  # finite in f32, inf in f16 (max 65504)
    save_artifact(art)
    with pytest.raises(ArtifactError) as info:
        save_artifact(art, torch.float16)
    assert info.value.field == "head.weight"


def test_save_rejects_a_disallowed_dtype_argument() -> None:
    with pytest.raises(ValueError, match="dtype"):
        save_artifact(make(), torch.float64)


def test_write_and_read_file(tmp_path: Path) -> None:
    path = tmp_path / "task.safetensors"
    art = make("deep")
    write_artifact(art, path, torch.bfloat16)
    assert os.listdir(tmp_path) == ["task.safetensors"]  # the temp file was renamed, not left behind
    assert torch.equal(read_artifact(path).prompts, art.prompts.to(torch.bfloat16))
    assert read_metadata_file(path) == read_metadata(path.read_bytes())


def test_write_failure_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "task.safetensors"
    write_artifact(make(), path)
    before = path.read_bytes()
    with pytest.raises(ArtifactError):
        write_artifact(make(labels=["only one"]), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["task.safetensors"]


def test_reference_writer_output_is_accepted() -> None:
    """A trainer may write with safetensors.torch.save directly; any key order must load."""
    art = make("deep")
    data = safetensors.torch.save(
        {"prompts": art.prompts, "head.weight": art.head_weight, "head.bias": art.head_bias},
        metadata=good_meta(mode="deep", labels=json.dumps(art.labels)),
    )
    assert torch.equal(load_artifact(data).prompts, art.prompts)


# ---------------------------------------------------------------------------------------------------
# Header-only metadata


def test_metadata_matches_the_artifact() -> None:
    data = save_artifact(make("deep", name="n", train_summary={"acc": 0.5}), torch.float16)
    meta = read_metadata(data)
    assert meta == ArtifactMetadata(
        format=FORMAT,
        mode="deep",
        backbone="vit_test_tiny",
        backbone_fingerprint=FP,
        labels=[f"class {i}" for i in range(C)],
        name="n",
        description=None,
        train_summary={"acc": 0.5},
        prompt_shape=(DEPTH, P, D),
        num_classes=C,
        embed_dim=D,
        dtype="float16",
        nbytes=2 * (DEPTH * P * D + C * D + C),
        extra_metadata={},
        file_size=len(data),
    )
    assert meta.torch_dtype == torch.float16
    assert (meta.prompt_length, meta.num_prompt_layers) == (P, DEPTH)


def test_metadata_reads_no_tensor_data() -> None:
    data = save_artifact(make("deep"))
    (n,) = struct.unpack_from("<Q", data)
    prefix = data[: 8 + n]  # no data section at all
    meta = read_metadata(prefix, partial=True)
    assert meta.file_size == len(data)
    with pytest.raises(ArtifactError) as info:  # without partial=True the missing data is an error
        read_metadata(prefix)
    assert info.value.field == "file"
    # Values are not looked at: a NaN is invisible to read_metadata and caught by load_artifact.
    nan = _raw(dict(good_tensors(), **{"head.bias": torch.full((C,), math.nan)}), good_meta())
    read_metadata(nan)
    assert_refused(nan, "head.bias")


@pytest.mark.parametrize("change", ["truncate", "append"])
def test_metadata_file_checks_the_size_on_disk(tmp_path: Path, change: str) -> None:
    data = save_artifact(make())
    path = tmp_path / "t.safetensors"
    path.write_bytes(data[:-1] if change == "truncate" else data + b"\0")
    with pytest.raises(ArtifactError) as info:
        read_metadata_file(path)
    assert info.value.field == "file"


def test_partial_metadata_enforces_the_size_limit() -> None:
    data = save_artifact(make("deep"))
    (n,) = struct.unpack_from("<Q", data)
    with pytest.raises(ArtifactError) as info:
        read_metadata(data[: 8 + n], ArtifactLimits(max_bytes=len(data) - 1), partial=True)
    assert info.value.field == "file"


# ---------------------------------------------------------------------------------------------------
# Decisions: unknown metadata keys, duplicate labels, minor versions


def test_unknown_metadata_keys_are_preserved() -> None:
    data = _patch(lambda h: h["__metadata__"].update({"x-team": "vision", "trainer_commit": "abc123"}))
    art = load_artifact(data)
    assert art.extra_metadata == {"x-team": "vision", "trainer_commit": "abc123"}
    assert read_metadata(data).extra_metadata == art.extra_metadata
    assert load_artifact(save_artifact(art)).extra_metadata == art.extra_metadata  # survives a re-save


def test_extra_metadata_cannot_shadow_format_keys() -> None:
    with pytest.raises(ArtifactError) as info:
        save_artifact(make(extra_metadata={"mode": "deep"}))
    assert info.value.field == "mode"


def test_duplicate_and_unicode_labels_are_allowed() -> None:
    # ImageNet-1k's usual class-name list has "crane" twice (bird, machine); refusing would break it.
    labels = ["crane", "crane", "日本語", "", 'quote " and \\ backslash']
    assert load_artifact(save_artifact(make(labels=labels))).labels == labels


def test_minor_versions_of_v1_are_read() -> None:
    data = _patch(lambda h: h["__metadata__"].update(format="vpt-task/1.7"))
    assert read_metadata(data).format == "vpt-task/1.7"
    load_artifact(data)


def test_future_major_version_names_the_version() -> None:
    err = assert_refused(_patch(lambda h: h["__metadata__"].update(format="vpt-task/2")), "format")
    assert "version 2" in err.message


# ---------------------------------------------------------------------------------------------------
# One failing example per rule, each with the field it must name


def _tensors(**changes: torch.Tensor | None) -> dict[str, torch.Tensor]:
    out = good_tensors()
    for key, value in changes.items():
        name = key.replace("_", ".")
        if value is None:
            del out[name]
        else:
            out[name] = value
    return out


def _set_entry(name: str, **entry: Any) -> Callable[[dict[str, Any]], None]:
    return lambda h: h[name].update(entry)


# (id, bytes, expected field, limits)
RULE_CASES: list[tuple[str, Callable[[], bytes], str, ArtifactLimits | None]] = [
    # format / version
    ("format-missing", lambda: _raw(good_tensors(), good_meta(format=None)), "format", None),
    ("format-other", lambda: _raw(good_tensors(), good_meta(format="onnx")), "format", None),
    ("format-v2", lambda: _raw(good_tensors(), good_meta(format="vpt-task/2")), "format", None),
    ("format-v0", lambda: _raw(good_tensors(), good_meta(format="vpt-task/0")), "format", None),
    (
        "format-huge-version",
        lambda: _raw(good_tensors(), good_meta(format="vpt-task/" + "9" * 5000)),
        "format",
        None,
    ),
    # metadata table and keys
    (
        "metadata-not-object",
        lambda: _patch(lambda h: h.update({"__metadata__": ["a"]})),
        "__metadata__",
        None,
    ),
    ("metadata-non-string", lambda: _patch(lambda h: h["__metadata__"].update(name=3)), "__metadata__", None),
    ("mode-missing", lambda: _raw(good_tensors(), good_meta(mode=None)), "mode", None),
    ("mode-unknown", lambda: _raw(good_tensors(), good_meta(mode="medium")), "mode", None),
    ("backbone-missing", lambda: _raw(good_tensors(), good_meta(backbone=None)), "backbone", None),
    ("backbone-empty", lambda: _raw(good_tensors(), good_meta(backbone="")), "backbone", None),
    (
        "fingerprint-missing",
        lambda: _raw(good_tensors(), good_meta(backbone_fingerprint=None)),
        "backbone_fingerprint",
        None,
    ),
    (
        "fingerprint-empty",
        lambda: _raw(good_tensors(), good_meta(backbone_fingerprint="")),
        "backbone_fingerprint",
        None,
    ),
    ("labels-missing", lambda: _raw(good_tensors(), good_meta(labels=None)), "labels", None),
    ("labels-not-json", lambda: _raw(good_tensors(), good_meta(labels="cat, dog")), "labels", None),
    ("labels-not-list", lambda: _raw(good_tensors(), good_meta(labels='{"0": "cat"}')), "labels", None),
    ("labels-count", lambda: _raw(good_tensors(), good_meta(labels='["a", "b"]')), "labels", None),
    ("labels-non-string", lambda: _raw(good_tensors(), good_meta(labels="[1, 2, 3, 4, 5]")), "labels", None),
    ("labels-nested-deep", lambda: _raw(good_tensors(), good_meta(labels="[" * 200_000)), "labels", None),
    (
        "summary-not-object",
        lambda: _raw(good_tensors(), good_meta(train_summary="[1]")),
        "train_summary",
        None,
    ),
    (
        "summary-nan",
        lambda: _raw(good_tensors(), good_meta(train_summary='{"loss": NaN}')),
        "train_summary",
        None,
    ),
    ("summary-not-json", lambda: _raw(good_tensors(), good_meta(train_summary="{")), "train_summary", None),
    # tensor set
    ("tensor-unknown", lambda: _raw(dict(good_tensors(), extra=torch.zeros(2)), good_meta()), "extra", None),
    ("tensor-missing", lambda: _raw(_tensors(head_bias=None), good_meta()), "head.bias", None),
    # mode vs L_p, shapes, D, C
    ("shallow-two-layers", lambda: _raw(good_tensors(layers=2), good_meta()), "mode", None),
    (
        "deep-linear-probe",
        lambda: _raw(good_tensors(layers=DEPTH, plen=0), good_meta(mode="deep")),
        "mode",
        None,
    ),
    ("prompts-no-layers", lambda: _raw(good_tensors(layers=0), good_meta(mode="deep")), "prompts", None),
    ("prompts-2d", lambda: _raw(_tensors(prompts=torch.zeros(P, D)), good_meta()), "prompts", None),
    ("prompts-zero-width", lambda: _raw(good_tensors(dim=0), good_meta()), "prompts", None),
    (
        "head-width",
        lambda: _raw(_tensors(head_weight=torch.zeros(C, D + 1)), good_meta()),
        "head.weight",
        None,
    ),
    ("head-3d", lambda: _raw(_tensors(head_weight=torch.zeros(1, C, D)), good_meta()), "head.weight", None),
    ("no-classes", lambda: _raw(good_tensors(classes=0), good_meta(labels="[]")), "head.weight", None),
    ("bias-shape", lambda: _raw(_tensors(head_bias=torch.zeros(C + 1)), good_meta()), "head.bias", None),
    # dtypes
    (
        "dtype-I64",
        lambda: _raw(_tensors(prompts=torch.zeros(1, P, D, dtype=torch.int64)), good_meta()),
        "prompts",
        None,
    ),
    ("dtype-F64", lambda: _patch(_set_entry("head.bias", dtype="F64")), "head.bias", None),
    (
        "dtype-mixed",
        lambda: _raw(_tensors(head_weight=torch.zeros(C, D, dtype=torch.float16)), good_meta()),
        "head.weight",
        None,
    ),
    # values
    (
        "nan-prompts",
        lambda: _raw(_tensors(prompts=torch.full((1, P, D), math.nan)), good_meta()),
        "prompts",
        None,
    ),
    (
        "inf-head",
        lambda: _raw(_tensors(head_weight=torch.full((C, D), -math.inf)), good_meta()),
        "head.weight",
        None,
    ),
    (
        "nan-bias-bf16",
        lambda: save_artifact(make(dtype=torch.bfloat16))[:-2] + b"\xc0\x7f",
        "head.bias",
        None,
    ),
    # limits
    (
        "limit-prompt-length",
        lambda: save_artifact(make()),
        "prompts",
        ArtifactLimits(max_prompt_length=P - 1),
    ),
    ("limit-classes", lambda: save_artifact(make()), "head.weight", ArtifactLimits(max_classes=C - 1)),
    ("limit-bytes", lambda: save_artifact(make()), "file", ArtifactLimits(max_bytes=100)),
    ("limit-header", lambda: save_artifact(make()), "header", ArtifactLimits(max_header_bytes=64)),
    # container: entries, offsets, lengths
    ("entry-not-object", lambda: _patch(lambda h: h.update({"head.bias": [0, 20]})), "head.bias", None),
    ("entry-extra-key", lambda: _patch(_set_entry("head.bias", pickle="cos\nsystem\n")), "head.bias", None),
    ("shape-vs-offsets", lambda: _patch(_set_entry("head.bias", shape=[C + 1])), "head.bias", None),
    ("dtype-vs-offsets", lambda: _patch(_all_f16), "prompts", None),
    ("shape-huge", lambda: _patch(_set_entry("prompts", shape=[2**40, 2**40, 2**40])), "prompts", None),
    ("shape-negative", lambda: _patch(_set_entry("prompts", shape=[1, -P, D])), "prompts", None),
    ("shape-bool", lambda: _patch(_set_entry("head.bias", shape=[True] * 1)), "head.bias", None),
    (
        "offsets-negative",
        lambda: _patch(_set_entry("prompts", data_offsets=[-4, P * D * 4 - 4])),
        "prompts",
        None,
    ),
    (
        "offsets-float",
        lambda: _patch(_set_entry("prompts", data_offsets=[0.0, P * D * 4.0])),
        "prompts",
        None,
    ),
    ("offsets-reversed", lambda: _patch(_set_entry("head.bias", data_offsets=[20, 0])), "head.bias", None),
    ("offsets-overlap", lambda: _patch(_overlap), "head.weight", None),
    ("offsets-gap", lambda: _patch(_gap), "head.bias", None),
    ("offsets-out-of-range", lambda: _patch(_shift_past_end), "file", None),
    ("truncated", lambda: save_artifact(make())[:-3], "file", None),
    ("trailing-bytes", lambda: save_artifact(make()) + b"\0" * 8, "file", None),
    ("too-short", lambda: b"\x10\0\0", "file", None),
    # header
    ("header-length-2**60", lambda: struct.pack("<Q", 2**60) + b"{}", "header", None),
    ("header-length-past-end", lambda: struct.pack("<Q", 1000) + b'{"a": 1}', "header", None),
    ("header-length-tiny", lambda: struct.pack("<Q", 1) + b"{", "header", None),
    ("header-not-json", lambda: _join(b"{this is not json}", b""), "header", None),
    ("header-array", lambda: _join(b"[1, 2, 3]", b""), "header", None),
    ("header-leading-space", lambda: _patch_raw(lambda raw: b" " + raw), "header", None),
    ("header-not-utf8", lambda: _join(b'{"\xff\xfe": 1}', b""), "header", None),
    ("header-duplicate-key", lambda: _join(b'{"prompts": {}, "prompts": {}}', b""), "header", None),
    ("header-nested-deep", lambda: _join(b'{"a":' + b"[" * 200_000, b""), "header", None),
    ("header-huge-int", lambda: _join(b'{"a": ' + b"9" * 100_000 + b"}", b""), "header", None),
]


def _entry_ranges(h: dict[str, Any]) -> dict[str, list[int]]:
    return {k: v["data_offsets"] for k, v in h.items() if k != "__metadata__"}


def _all_f16(h: dict[str, Any]) -> None:
    # Shapes and dtypes agree with each other and every rule above the container, only the byte counts
    # (sized for F32) no longer match: nothing but the shape x dtype == span check can catch it.
    for name in ("prompts", "head.weight", "head.bias"):
        h[name]["dtype"] = "F16"


def _overlap(h: dict[str, Any]) -> None:
    # head.weight starts 4 bytes early: it overlaps prompts (and leaves 4 bytes at the end uncovered).
    start, end = _entry_ranges(h)["head.weight"]
    h["head.weight"]["data_offsets"] = [start - 4, end - 4]


def _gap(h: dict[str, Any]) -> None:
    start, end = _entry_ranges(h)["head.bias"]
    h["head.bias"]["data_offsets"] = [start + 4, end + 4]


def _shift_past_end(h: dict[str, Any]) -> None:
    # Append-style lie: every range is consistent and tiled, but the last one ends past the data.
    start, end = _entry_ranges(h)["head.bias"]
    h["head.bias"]["shape"] = [C + 100]
    h["head.bias"]["data_offsets"] = [start, end + 400]


@pytest.mark.parametrize(
    ("build", "field", "limits"), [c[1:] for c in RULE_CASES], ids=[c[0] for c in RULE_CASES]
)
def test_rule(build: Callable[[], bytes], field: str, limits: ArtifactLimits | None) -> None:
    assert_refused(build(), field, limits)


def test_rule_cases_have_a_good_twin() -> None:
    """The builders are only meaningful if their unbroken versions load: check the baselines."""
    load_artifact(_raw(good_tensors(), good_meta()))
    load_artifact(_patch(lambda h: None))
    load_artifact(_patch_raw(lambda raw: raw + b"   "))  # trailing padding is fine, as writers pad
    load_artifact(_raw(good_tensors(layers=DEPTH), good_meta(mode="deep")))
    load_artifact(_raw(good_tensors(plen=0), good_meta()))
    load_artifact(save_artifact(make(dtype=torch.bfloat16)))


def test_error_type_is_a_picklable_value_error() -> None:
    err = ArtifactError("labels", "has 2 entries")
    assert isinstance(err, ValueError)
    assert str(err) == "labels: has 2 entries"
    again = pickle.loads(pickle.dumps(err))
    assert (again.field, again.message) == ("labels", "has 2 entries")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"prompts": [[0.0]]}, "prompts"),
        ({"prompts": torch.zeros(1, P, D, dtype=torch.int32)}, "prompts"),
        ({"mode": "both"}, "mode"),
        ({"labels": ("a",) * C}, "labels"),
        ({"labels": [*["a"] * (C - 1), None]}, "labels"),
        ({"name": 3}, "name"),
        ({"description": b"bytes"}, "description"),
        ({"backbone": None}, "backbone"),
        ({"train_summary": [1, 2]}, "train_summary"),
        ({"train_summary": {"loss": math.nan}}, "train_summary"),
        ({"train_summary": {"when": object()}}, "train_summary"),
        ({"extra_metadata": {"k": 1}}, "__metadata__"),
    ],
    ids=lambda v: str(v)[:40],
)
def test_save_validates_before_writing(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ArtifactError) as info:
        save_artifact(make(**overrides))
    assert info.value.field == field


def test_save_enforces_the_header_limit() -> None:
    # Labels live in the header, so they are what a header limit bounds.
    art = make(labels=["x" * 1000] * C)
    with pytest.raises(ArtifactError) as info:
        save_artifact(art, limits=ArtifactLimits(max_header_bytes=2000))
    assert info.value.field == "header"
    validate_artifact(art)  # nothing else is wrong with it


# ---------------------------------------------------------------------------------------------------
# Hostile input: never a crash, never a big allocation, never code execution


class _Touch:
    """Unpickling this creates `path`: proof that a loader ran attacker code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "w"))


def test_pickle_payload_is_never_executed(tmp_path: Path) -> None:
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Touch(str(control)))).close()
    assert control.exists()  # the payload is live: a loader that unpickles would run it

    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"prompts": _Touch(str(marker))}, buf)
    legacy = io.BytesIO()
    torch.save({"prompts": _Touch(str(marker))}, legacy, _use_new_zipfile_serialization=False)
    raw_pickle = pickle.dumps(_Touch(str(marker)))
    # A pickle behind a plausible header length (refused at byte 8, where the JSON header belongs).
    disguised = struct.pack("<Q", len(raw_pickle)) + raw_pickle
    for data, field in (
        (buf.getvalue(), "header"),
        (legacy.getvalue(), "header"),
        (raw_pickle, "header"),
        (disguised, "header"),
    ):
        assert_refused(data, field)
        with pytest.raises(ArtifactError):
            read_metadata(data)
        path = tmp_path / "upload.safetensors"
        path.write_bytes(data)
        with pytest.raises(ArtifactError):
            read_artifact(path)
        with pytest.raises(ArtifactError):
            read_metadata_file(path)
    assert not marker.exists()


def test_torch_save_checkpoint_is_refused() -> None:
    buf = io.BytesIO()
    art = make()
    torch.save({"prompts": art.prompts, "head.weight": art.head_weight, "head.bias": art.head_bias}, buf)
    assert_refused(buf.getvalue(), "header")


def test_random_bytes_are_refused() -> None:
    rng = random.Random(1234)
    for _ in range(200):
        data = rng.randbytes(rng.randrange(0, 2048))
        with pytest.raises(ArtifactError):
            load_artifact(data)
        # Random bytes behind a small, honest length prefix reach the JSON parser.
        with pytest.raises(ArtifactError):
            load_artifact(struct.pack("<Q", len(data)) + data)


def test_a_file_that_is_no_safetensors_file_says_so(tmp_path: Path) -> None:
    """Its first 8 bytes make a meaningless header length (an upload of random bytes was told "header
    length 6834780133576298201 exceeds the limit of 1048576 bytes"): the message says what it is not."""
    noise = random.Random(5).randbytes(4096)
    zipped = io.BytesIO()
    torch.save({"prompts": torch.zeros(2)}, zipped)
    raw_pickle = pickle.dumps({"prompts": [0.0, 0.0]})
    disguised = struct.pack("<Q", len(raw_pickle)) + raw_pickle  # a plausible length, then no '{'
    for data in (noise, zipped.getvalue(), raw_pickle, disguised, b"plain text, not an artifact\n"):
        assert data[8] not in b"{ \t\r\n"
        expected = f"not a safetensors file: byte 8 is 0x{data[8]:02x}, where a safetensors file starts"
        assert assert_refused(data, "header").message == expected + " its JSON header with '{'"
        path = tmp_path / "upload.safetensors"
        path.write_bytes(data)
        for read, arg in ((read_metadata, data), (read_metadata_file, path), (read_artifact, path)):
            with pytest.raises(ArtifactError) as info:
                read(arg)  # type: ignore[operator]
            assert info.value.field == "header" and info.value.message.startswith(expected)
    # A '{' where the header belongs: the length is reported as what it claims to be.
    err = assert_refused(struct.pack("<Q", 2**60) + b"{}", "header")
    assert err.message.startswith("header length 1152921504606846976 exceeds the limit of")
    err = assert_refused(_patch_raw(lambda raw: b" " + raw), "header")  # whitespace: valid elsewhere
    assert err.message == "header does not start with '{'"


def test_corrupted_files_load_or_raise_artifact_error() -> None:
    """Byte flips anywhere in a good file: a typed error or a (still valid) artifact, nothing else."""
    rng = random.Random(99)
    good = save_artifact(make("deep", train_summary={"a": [1, 2]}))
    outcomes = set()
    for _ in range(300):
        data = bytearray(good)
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            load_artifact(bytes(data))
            outcomes.add("loaded")
        except ArtifactError as e:
            outcomes.add(e.field)
    assert "loaded" in outcomes and len(outcomes) > 2  # the fuzzer reached both outcomes and many rules


def test_oversized_file_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.truncate(64 * 1024 * 1024 + 1)  # sparse: nothing is written, nothing should be read
    tracemalloc.start()
    try:
        with pytest.raises(ArtifactError) as info:
            read_artifact(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.field == "file"
    assert peak < 1 << 20


def test_huge_header_length_is_not_read_from_disk(tmp_path: Path) -> None:
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    with pytest.raises(ArtifactError) as info:
        read_metadata_file(path)
    assert info.value.field == "header"


# ---------------------------------------------------------------------------------------------------
# Compatibility with a running backbone


@pytest.fixture(params=["artifact", "metadata"])
def as_view(request: pytest.FixtureRequest) -> Callable[[TaskArtifact], TaskArtifact | ArtifactMetadata]:
    if request.param == "artifact":
        return lambda art: load_artifact(save_artifact(art))
    return lambda art: read_metadata(save_artifact(art))


SIG = BackboneSignature(embed_dim=D, depth=DEPTH, fingerprint=FP, backbone_id="vit_test_tiny")


@pytest.mark.parametrize("kind", ["shallow", "deep", "linear"])
def test_backbone_accepts_a_matching_task(kind: str, as_view: Callable[..., Any]) -> None:
    validate_for_backbone(as_view(make(kind)), SIG)


@pytest.mark.parametrize(
    ("kind", "sig", "field"),
    [
        ("shallow", BackboneSignature(embed_dim=D * 2, depth=DEPTH, fingerprint=FP), "prompts"),
        ("linear", BackboneSignature(embed_dim=D * 2, depth=DEPTH, fingerprint=FP), "prompts"),
        ("deep", BackboneSignature(embed_dim=D, depth=DEPTH + 1, fingerprint=FP), "prompts"),
        (
            "shallow",
            BackboneSignature(embed_dim=D, depth=DEPTH, fingerprint="sha256:" + "cd" * 32),
            "backbone_fingerprint",
        ),
    ],
    ids=["width", "width-linear", "deep-depth", "fingerprint"],
)
def test_backbone_refuses_a_mismatched_task(
    kind: str, sig: BackboneSignature, field: str, as_view: Callable[..., Any]
) -> None:
    with pytest.raises(ArtifactError) as info:
        validate_for_backbone(as_view(make(kind)), sig)
    assert info.value.field == field


def test_shallow_task_fits_any_depth() -> None:
    validate_for_backbone(make(), BackboneSignature(embed_dim=D, depth=24, fingerprint=FP))


def test_fingerprint_message_shows_both_truncated() -> None:
    other = "sha256:" + "cd" * 32
    with pytest.raises(ArtifactError) as info:
        validate_for_backbone(
            make(), BackboneSignature(embed_dim=D, depth=DEPTH, fingerprint=other, backbone_id="vit_b")
        )
    msg = str(info.value)
    assert FP[:16] in msg and other[:16] in msg
    assert FP not in msg and other not in msg  # truncated: 64-hex digests would drown the message
    assert "vit_b" in msg and "vit_test_tiny" in msg


def test_limits_reject_nonsense() -> None:
    with pytest.raises(ValueError):
        ArtifactLimits(max_bytes=0)


def test_docs_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/artifact-format.md's example is the format's tutorial; keep it executable."""
    doc = (Path(__file__).parents[2] / "docs" / "artifact-format.md").read_text()
    blocks = [b.split("```", 1)[0] for b in doc.split("```python\n")[1:]]
    assert blocks, "the format doc lost its Python example"
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "artifact-format.md", "exec"), {})
    assert read_metadata_file(tmp_path / "pets.safetensors").name == "pets"
