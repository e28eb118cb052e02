"""The safetensors container, read defensively and written deterministically.

Layout (https://github.com/huggingface/safetensors, "Format"): an unsigned little-endian 64-bit header
length N, N bytes of UTF-8 JSON (an object: tensor name -> {dtype, shape, data_offsets}, plus an
optional `__metadata__` object of string -> string), then the data section, which the tensors' byte
ranges must tile exactly. This module knows nothing about VPT; `artifact.py` layers the task format
on top.

Why parse the header ourselves before handing bytes to the `safetensors` library: uploads are
untrusted. Checking the length prefix against a limit and against the real size, then checking every
offset against the bytes actually present, turns hostile input into a typed `ArtifactError` before
anything allocates in proportion to numbers an attacker wrote. Nothing here (or anywhere in the
artifact code) unpickles.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from prompt_store.errors import ArtifactError

_LENGTH = struct.Struct("<Q")  # the 8-byte little-endian header length prefix
PREFIX_BYTES = _LENGTH.size
METADATA_KEY = "__metadata__"
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})


def short(text: str, limit: int = 64) -> str:
    """repr of `text`, cut to `limit` characters, for messages that may quote hostile input."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} chars)"


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Python's json and the Rust serde reader could disagree on which duplicate wins; a header that
    # means different things to the validator and the loader is exactly what an attacker wants.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {short(key)}")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    # NaN / Infinity are not JSON; accepting them would make metadata that HTTP responses cannot carry.
    raise ValueError(f"non-standard JSON constant {name}")


def loads_json(text: str, field: str) -> Any:
    """Strict `json.loads`: no duplicate keys, no NaN/Infinity, and never a crash.

    Deep nesting raises RecursionError inside the json module and over-long integers raise ValueError
    (Python >= 3.11's digit limit); both become `ArtifactError(field)`.
    """
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except RecursionError:
        raise ArtifactError(field, "JSON is nested too deeply") from None
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        raise ArtifactError(field, f"not valid JSON ({e})") from None


def read_header(data: bytes | memoryview, max_header_bytes: int) -> tuple[dict[str, Any], int]:
    """Parse the length prefix and JSON header of a safetensors buffer.

    `data` may be the whole file or any prefix holding at least the header. Returns the header object
    and the offset at which the data section starts. Copies at most `max_header_bytes`.
    """
    size = len(data)
    if size < PREFIX_BYTES:
        raise ArtifactError("file", f"{size} bytes is too short for a safetensors file (no header length)")
    (n,) = _LENGTH.unpack_from(data, 0)
    # A writer puts '{' right after the length. Anything else there (but the whitespace the reference
    # reader skips, refused below) means the 8 bytes are no length either - random bytes, a pickle, a zip
    # archive - so say what the file is not, rather than quote the number its first bytes happen to make.
    if size > PREFIX_BYTES and data[PREFIX_BYTES] not in b"{ \t\r\n":
        raise ArtifactError(
            "header",
            f"not a safetensors file: byte {PREFIX_BYTES} is 0x{data[PREFIX_BYTES]:02x}, where a safetensors "
            "file starts its JSON header with '{'",
        )
    if n > max_header_bytes:
        # Checked before anything else touches n: 2**60 must not reach a slice or an allocation.
        raise ArtifactError(
            "header",
            f"header length {n} exceeds the limit of {max_header_bytes} bytes (not a task artifact?)",
        )
    if n < 2:
        raise ArtifactError("header", f"header length {n} is too small to hold a JSON object")
    if PREFIX_BYTES + n > size:
        raise ArtifactError(
            "header", f"header length {n} runs past the end of the data ({size} bytes): truncated file?"
        )
    raw = bytes(data[PREFIX_BYTES : PREFIX_BYTES + n])
    # Stricter than the reference reader, which skips leading whitespace: every writer starts the header
    # with '{' (other bytes there were refused above).
    if raw[:1] != b"{":
        raise ArtifactError("header", "header does not start with '{'")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ArtifactError("header", f"header is not UTF-8 ({e.reason} at byte {e.start})") from None
    header = loads_json(text, "header")
    if not isinstance(header, dict):
        raise ArtifactError("header", f"header must be a JSON object, got {type(header).__name__}")
    return header, PREFIX_BYTES + n


def read_metadata_table(header: Mapping[str, Any]) -> dict[str, str]:
    """The `__metadata__` object; safetensors allows only string values there."""
    meta = header.get(METADATA_KEY, {})
    if not isinstance(meta, dict):
        raise ArtifactError(METADATA_KEY, f"must be a JSON object, got {type(meta).__name__}")
    for key, value in meta.items():
        if not isinstance(value, str):
            raise ArtifactError(
                METADATA_KEY, f"value of {short(key)} must be a string, got {type(value).__name__}"
            )
    return meta


@dataclass(frozen=True)
class TensorEntry:
    """One tensor's header record, checked for internal consistency."""

    name: str
    dtype: str  # safetensors dtype code, e.g. "F32"
    shape: tuple[int, ...]
    start: int  # byte offset into the data section (not into the file)
    end: int  # exclusive; end - start == prod(shape) * itemsize


def _is_int(value: Any) -> bool:
    # JSON true/false arrive as bool, which is an int subclass in Python; they are not sizes.
    return isinstance(value, int) and not isinstance(value, bool)


def parse_tensor_entry(name: str, info: Any, itemsizes: Mapping[str, int]) -> TensorEntry:
    """Check one `{dtype, shape, data_offsets}` record; `itemsizes` maps the allowed dtype codes to bytes."""
    field = name if len(name) <= 128 else name[:128]
    if not isinstance(info, dict):
        raise ArtifactError(field, f"header entry must be an object, got {type(info).__name__}")
    if set(info) != _ENTRY_KEYS:
        raise ArtifactError(
            field, f"header entry must have exactly the keys {sorted(_ENTRY_KEYS)}, got {sorted(info)}"
        )
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in itemsizes:
        shown = short(dtype) if isinstance(dtype, str) else repr(type(dtype).__name__)
        raise ArtifactError(field, f"dtype {shown} is not allowed (allowed: {', '.join(itemsizes)})")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise ArtifactError(field, f"shape must be a list of non-negative integers, got {str(shape)[:80]}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise ArtifactError(field, f"data_offsets must be [begin, end] integers, got {str(offsets)[:80]}")
    start, end = offsets
    if start < 0 or end < start:
        raise ArtifactError(field, f"data_offsets [{start}, {end}] are negative or reversed")
    # Python ints do not overflow, so a hostile shape like [2**40, 2**40] just fails this comparison.
    needed = math.prod(shape) * itemsizes[dtype]
    if needed != end - start:
        raise ArtifactError(
            field,
            f"shape {shape} of {dtype} needs {needed} bytes but data_offsets [{start}, {end}] span {end - start}",
        )
    return TensorEntry(name=name, dtype=dtype, shape=tuple(shape), start=start, end=end)


def check_tiling(entries: Iterable[TensorEntry]) -> int:
    """The byte ranges must tile [0, total) with no gap and no overlap; returns total.

    Gaps would be bytes no tensor accounts for (a place to smuggle data); overlaps would alias two
    tensors. The reference reader enforces the same rule.
    """
    expected = 0
    for e in sorted(entries, key=lambda e: (e.start, e.end)):
        if e.start < expected:
            raise ArtifactError(
                e.name, f"data_offsets [{e.start}, {e.end}] overlap the previous tensor (ends at {expected})"
            )
        if e.start > expected:
            raise ArtifactError(
                e.name, f"data_offsets [{e.start}, {e.end}] leave a gap after byte {expected}"
            )
        expected = e.end
    return expected


def check_data_length(available: int, needed: int) -> None:
    """The data section must be exactly as long as the tensors say (no truncation, no trailing bytes)."""
    if available < needed:
        raise ArtifactError(
            "file", f"truncated: the header describes {needed} data bytes, only {available} present"
        )
    if available > needed:
        raise ArtifactError(
            "file", f"{available - needed} trailing bytes after the {needed} data bytes the header describes"
        )


def encode(tensors: Iterable[tuple[str, str, tuple[int, ...], bytes]], metadata: Mapping[str, str]) -> bytes:
    """Serialise (name, dtype code, shape, little-endian bytes) records into one safetensors buffer.

    Unlike `safetensors.torch.save` (whose metadata order follows a Rust HashMap and changes from run to
    run), the output is a pure function of the input: same task, same bytes, same content hash. Tensors
    are laid out in the given order; the header is space-padded so the data section starts 8-byte
    aligned, as the reference writer does (lets mmap readers view tensors in place).
    """
    header: dict[str, Any] = {METADATA_KEY: dict(metadata)}
    chunks: list[bytes] = []
    offset = 0
    for name, dtype, shape, payload in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(payload)]}
        chunks.append(payload)
        offset += len(payload)
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # 8-byte prefix + multiple-of-8 header ⇒ aligned data section
    return b"".join([_LENGTH.pack(len(raw)), raw, *chunks])


def little_endian_bytes(array_bytes: bytes, itemsize: int) -> bytes:
    """Host-order element bytes → little-endian (the file's byte order); a no-op on little-endian hosts."""
    if sys.byteorder == "little" or itemsize == 1:
        return array_bytes
    out = bytearray(array_bytes)
    for i in range(0, len(out), itemsize):
        out[i : i + itemsize] = out[i : i + itemsize][::-1]
    return bytes(out)
