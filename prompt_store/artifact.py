"""Task artifact format v1 (`vpt-task/1`): one safetensors file per VPT task.

A Visual Prompt Tuning task (Jia et al., "Visual Prompt Tuning", ECCV 2022, arXiv 2203.12119, Sec. 3.2)
is everything learned on top of a frozen ViT: prompt tokens and a linear head on the CLS feature.
VPT-shallow learns one prompt set inserted before layer 0; VPT-deep learns one set per layer (the
official code's `prompt_embeddings` (1, P, D) + `deep_prompt_embeddings` (L-1, P, D), stored here as
one (L, P, D) tensor). The head is the paper's linear classifier (C, D) + (C,).

This file is the contract between trainer, server, store and clients; docs/artifact-format.md is its
prose twin (tensor names, metadata keys, every validation rule and the versioning rule). Untrusted
bytes are checked header-first by `artifact_header` before the safetensors library sees them, and
nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import safetensors.torch
import torch
from safetensors import SafetensorError

from prompt_store.artifact_header import (
    METADATA_KEY,
    PREFIX_BYTES,
    TensorEntry,
    check_data_length,
    check_tiling,
    encode,
    little_endian_bytes,
    loads_json,
    parse_tensor_entry,
    read_header,
    read_metadata_table,
    short,
)
from prompt_store.artifact_rules import (
    DTYPE_CODES,
    DTYPES,
    FORMAT,
    HEAD_BIAS,
    HEAD_WEIGHT,
    ITEMSIZES,
    PROMPTS,
    REQUIRED_METADATA,
    RESERVED_METADATA,
    TENSOR_NAMES,
    ArtifactLimits,
    check_extra,
    check_finite,
    check_format,
    check_labels,
    check_mode,
    check_shapes,
    check_text,
    encode_summary,
)
from prompt_store.errors import ArtifactError

__all__ = [
    "FORMAT",
    "ArtifactError",
    "ArtifactLimits",
    "ArtifactMetadata",
    "BackboneSignature",
    "TaskArtifact",
    "atomic_write",
    "load_artifact",
    "read_artifact",
    "read_metadata",
    "read_metadata_file",
    "save_artifact",
    "validate_artifact",
    "validate_for_backbone",
    "write_artifact",
]


@dataclass(frozen=True)
class BackboneSignature:
    """What a running backbone needs to check a task: a task fits only the exact weights it was tuned on."""

    embed_dim: int  # D of the backbone; prompts and head must have the same width
    depth: int  # L, transformer blocks; a VPT-deep task carries exactly L prompt sets
    fingerprint: str  # hash of the frozen weights' bytes, compared for equality with the artifact's
    backbone_id: str = ""  # human-readable id (e.g. a timm preset name), only used in messages


@dataclass
class TaskArtifact:
    """One VPT task in memory. Build it, then `save_artifact`/`write_artifact` validate and serialise."""

    # L_p = 1 shallow, = depth deep; P = 0 (stored as (1, 0, D), mode shallow) is a linear probe
    prompts: torch.Tensor  # (L_p, P, D)
    head_weight: torch.Tensor  # (C, D) linear head on the final CLS feature
    head_bias: torch.Tensor  # (C,)
    mode: Literal["shallow", "deep"]  # VPT-shallow (prompts before layer 0) or VPT-deep (before every layer)
    backbone: str  # backbone id the task was trained on; informative, never compared
    backbone_fingerprint: str  # fingerprint of those backbone weights; must equal the server's
    labels: list[str]  # class names, one per head row; duplicates allowed (see docs)
    name: str | None = None  # optional display name
    description: str | None = None  # optional free text
    train_summary: dict[str, Any] | None = None  # optional JSON object: hyper-parameters, metrics, ...
    extra_metadata: dict[str, str] = field(default_factory=dict)  # unknown header keys, carried through

    @property
    def prompt_length(self) -> int:
        """P, prompt tokens per layer (0 for a linear probe)."""
        return int(self.prompts.shape[1])

    @property
    def num_classes(self) -> int:
        """C."""
        return int(self.head_weight.shape[0])

    @property
    def embed_dim(self) -> int:
        """D."""
        return int(self.prompts.shape[2])

    @property
    def num_prompt_layers(self) -> int:
        """L_p: 1 for shallow, the backbone depth for deep."""
        return int(self.prompts.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.prompts.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data (what the task occupies in a prompt bank at this dtype)."""
        return sum(t.numel() * t.element_size() for t in (self.prompts, self.head_weight, self.head_bias))


@dataclass(frozen=True)
class ArtifactMetadata:
    """Header-only view of an artifact: everything but the tensor values, read without touching them."""

    format: str  # as written, e.g. "vpt-task/1"
    mode: str  # "shallow" | "deep"
    backbone: str
    backbone_fingerprint: str
    labels: list[str]
    name: str | None
    description: str | None
    train_summary: dict[str, Any] | None
    prompt_shape: tuple[int, int, int]  # (L_p, P, D)
    num_classes: int  # C
    embed_dim: int  # D
    dtype: str  # torch dtype name: "float32" | "float16" | "bfloat16" (getattr(torch, dtype) works)
    nbytes: int  # bytes of tensor data (the data section); file_size adds the header
    extra_metadata: dict[str, str] = field(default_factory=dict)  # unknown header keys, preserved
    file_size: int = 0  # whole file in bytes: 8 + header + nbytes

    @property
    def prompt_length(self) -> int:
        return self.prompt_shape[1]

    @property
    def num_prompt_layers(self) -> int:
        return self.prompt_shape[0]

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


# ---------------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class _Parsed:
    meta: ArtifactMetadata
    entries: dict[str, TensorEntry]


def _parse(data: bytes | memoryview, limits: ArtifactLimits, *, partial: bool) -> _Parsed:
    """Every check that needs only the header. `partial`: `data` may be just a prefix holding the header."""
    if not partial and len(data) > limits.max_bytes:
        raise ArtifactError("file", f"{len(data)} bytes exceeds the limit of {limits.max_bytes}")
    header, data_start = read_header(data, limits.max_header_bytes)
    table = read_metadata_table(header)
    # The version first: a future format may change anything below, and its reader deserves to be told
    # "version 2" rather than "unknown tensor".
    check_format(table)

    for name in header:
        if name != METADATA_KEY and name not in TENSOR_NAMES:
            raise ArtifactError(
                name[:128],
                f"unknown tensor {short(name)}; a {FORMAT} artifact holds exactly {list(TENSOR_NAMES)}",
            )
    for name in TENSOR_NAMES:
        if name not in header:
            raise ArtifactError(name, "missing tensor")
    entries = {name: parse_tensor_entry(name, header[name], ITEMSIZES) for name in TENSOR_NAMES}
    data_len = check_tiling(entries.values())
    file_size = data_start + data_len
    if partial:
        if file_size > limits.max_bytes:
            raise ArtifactError(
                "file", f"the header describes {file_size} bytes, over the limit of {limits.max_bytes}"
            )
    else:
        check_data_length(len(data) - data_start, data_len)

    dtype = entries[PROMPTS].dtype
    for name in (HEAD_WEIGHT, HEAD_BIAS):
        if entries[name].dtype != dtype:
            raise ArtifactError(
                name,
                f"dtype {entries[name].dtype} differs from prompts' {dtype}; all tensors share one dtype",
            )

    for key in REQUIRED_METADATA:
        if key not in table:
            raise ArtifactError(key, "missing required metadata key")
    mode = table["mode"]
    check_mode(mode)
    check_shapes(mode, entries[PROMPTS].shape, entries[HEAD_WEIGHT].shape, entries[HEAD_BIAS].shape, limits)
    check_text("backbone", table["backbone"], required=True)
    check_text("backbone_fingerprint", table["backbone_fingerprint"], required=True)
    L, P, D = entries[PROMPTS].shape
    C = entries[HEAD_WEIGHT].shape[0]
    labels = loads_json(table["labels"], "labels")
    check_labels(labels, C)
    summary = None
    if "train_summary" in table:
        summary = loads_json(table["train_summary"], "train_summary")
        if not isinstance(summary, dict):
            raise ArtifactError("train_summary", f"must be a JSON object, got {type(summary).__name__}")

    meta = ArtifactMetadata(
        format=table["format"],
        mode=mode,
        backbone=table["backbone"],
        backbone_fingerprint=table["backbone_fingerprint"],
        labels=labels,
        name=table.get("name"),
        description=table.get("description"),
        train_summary=summary,
        prompt_shape=(L, P, D),
        num_classes=C,
        embed_dim=D,
        dtype=str(DTYPES[dtype]).removeprefix("torch."),
        nbytes=data_len,
        extra_metadata={k: v for k, v in table.items() if k not in RESERVED_METADATA},
        file_size=file_size,
    )
    return _Parsed(meta=meta, entries=entries)


def read_metadata(
    data: bytes | memoryview, limits: ArtifactLimits | None = None, *, partial: bool = False
) -> ArtifactMetadata:
    """Parse and validate the header only; tensor values are not read (so NaNs are not detected here).

    With the whole file (default) the data length is checked too. `partial=True` accepts a prefix that
    holds at least the header (e.g. a ranged read from object storage); the size limit is then checked
    against the size the header describes.
    """
    return _parse(data, limits or ArtifactLimits(), partial=partial).meta


def read_metadata_file(
    path: str | os.PathLike[str], limits: ArtifactLimits | None = None
) -> ArtifactMetadata:
    """`read_metadata` on a file, reading only its header bytes (and checking its size on disk)."""
    limits = limits or ArtifactLimits()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limits.max_bytes:
            raise ArtifactError("file", f"{size} bytes exceeds the limit of {limits.max_bytes}")
        prefix = f.read(PREFIX_BYTES)
        if len(prefix) == PREFIX_BYTES:
            n = int.from_bytes(prefix, "little")
            # Over the limit, read_header reports it without reading n bytes; the one byte after the
            # length still tells a file that is no safetensors file at all.
            prefix += f.read(n if n <= limits.max_header_bytes else 1)
    parsed = _parse(prefix, limits, partial=True)
    header_end = parsed.meta.file_size - parsed.meta.nbytes
    check_data_length(size - header_end, parsed.meta.nbytes)
    return parsed.meta


def load_artifact(data: bytes | memoryview, limits: ArtifactLimits | None = None) -> TaskArtifact:
    """Validate and load a whole artifact: header rules, then the tensors via safetensors, then finiteness."""
    limits = limits or ArtifactLimits()
    parsed = _parse(data, limits, partial=False)
    try:
        tensors = safetensors.torch.load(data if isinstance(data, bytes) else bytes(data))
    except (SafetensorError, ValueError, RuntimeError, TypeError) as e:
        # Unreachable for inputs our header checks pass, as far as we know; kept so a disagreement with
        # the library is still a typed 4xx rather than a 500.
        raise ArtifactError("file", f"safetensors could not read the file ({e})") from None
    if set(tensors) != set(TENSOR_NAMES):
        raise ArtifactError(
            "file", f"safetensors returned tensors {sorted(tensors)}, the header said {list(TENSOR_NAMES)}"
        )
    for name in TENSOR_NAMES:
        entry, tensor = parsed.entries[name], tensors[name]
        if tuple(tensor.shape) != entry.shape or tensor.dtype != DTYPES[entry.dtype]:
            raise ArtifactError(name, "safetensors returned a tensor that disagrees with the header")
        check_finite(name, tensor)
    meta = parsed.meta
    return TaskArtifact(
        prompts=tensors[PROMPTS],
        head_weight=tensors[HEAD_WEIGHT],
        head_bias=tensors[HEAD_BIAS],
        mode=meta.mode,  # type: ignore[arg-type]  # checked by check_mode
        backbone=meta.backbone,
        backbone_fingerprint=meta.backbone_fingerprint,
        labels=meta.labels,
        name=meta.name,
        description=meta.description,
        train_summary=meta.train_summary,
        extra_metadata=meta.extra_metadata,
    )


def read_artifact(path: str | os.PathLike[str], limits: ArtifactLimits | None = None) -> TaskArtifact:
    """`load_artifact` on a file; an oversized file is refused from its size, before it is read."""
    limits = limits or ArtifactLimits()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limits.max_bytes:
            raise ArtifactError("file", f"{size} bytes exceeds the limit of {limits.max_bytes}")
        data = f.read(limits.max_bytes + 1)  # +1: a file that grew since fstat still fails the limit
    return load_artifact(data, limits)


# ---------------------------------------------------------------------------------------------------
# Writing


def validate_artifact(artifact: TaskArtifact, limits: ArtifactLimits | None = None) -> None:
    """Check an in-memory artifact against every rule that needs no serialisation (as load would)."""
    limits = limits or ArtifactLimits()
    tensors = {PROMPTS: artifact.prompts, HEAD_WEIGHT: artifact.head_weight, HEAD_BIAS: artifact.head_bias}
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise ArtifactError(name, f"must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype not in DTYPE_CODES:
            raise ArtifactError(name, f"dtype {tensor.dtype} is not allowed (float32, float16, bfloat16)")
    for name in (HEAD_WEIGHT, HEAD_BIAS):
        if tensors[name].dtype != artifact.prompts.dtype:
            raise ArtifactError(
                name,
                f"dtype {tensors[name].dtype} differs from prompts' {artifact.prompts.dtype}; pass dtype= to convert",
            )
    check_mode(artifact.mode)
    check_shapes(
        artifact.mode,
        tuple(artifact.prompts.shape),
        tuple(artifact.head_weight.shape),
        tuple(artifact.head_bias.shape),
        limits,
    )
    check_text("backbone", artifact.backbone, required=True)
    check_text("backbone_fingerprint", artifact.backbone_fingerprint, required=True)
    check_text("name", artifact.name, required=False)
    check_text("description", artifact.description, required=False)
    check_labels(artifact.labels, artifact.num_classes)
    if artifact.train_summary is not None:
        encode_summary(artifact.train_summary)
    check_extra(artifact.extra_metadata)
    for name, tensor in tensors.items():
        check_finite(name, tensor)


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().to("cpu").contiguous()
    return little_endian_bytes(flat.view(torch.uint8).numpy().tobytes(), flat.element_size())


def save_artifact(
    artifact: TaskArtifact, dtype: torch.dtype | None = None, *, limits: ArtifactLimits | None = None
) -> bytes:
    """Validate, convert to `dtype` (default: keep; the three tensors must then share one) and serialise.

    The output is deterministic (same artifact, same bytes) and is re-read with `read_metadata` before
    it is returned, so the header and size limits hold and anything written here loads.
    """
    limits = limits or ArtifactLimits()
    if dtype is not None and dtype not in DTYPE_CODES:
        raise ValueError(f"dtype must be one of {', '.join(map(str, DTYPE_CODES))}, got {dtype}")
    converted = {}
    for name, tensor in (
        (PROMPTS, artifact.prompts),
        (HEAD_WEIGHT, artifact.head_weight),
        (HEAD_BIAS, artifact.head_bias),
    ):
        if not isinstance(tensor, torch.Tensor):
            raise ArtifactError(name, f"must be a torch.Tensor, got {type(tensor).__name__}")
        # Convert before validating: an f32 value past f16's range (65504) only becomes inf here.
        converted[name] = tensor.detach().to(device="cpu", dtype=dtype or tensor.dtype)
    artifact = replace(
        artifact,
        prompts=converted[PROMPTS],
        head_weight=converted[HEAD_WEIGHT],
        head_bias=converted[HEAD_BIAS],
    )
    validate_artifact(artifact, limits)

    metadata = {
        "format": FORMAT,
        "mode": artifact.mode,
        "backbone": artifact.backbone,
        "backbone_fingerprint": artifact.backbone_fingerprint,
        # Compact separators: with many classes the labels dominate the header, which has a size limit.
        "labels": json.dumps(artifact.labels, ensure_ascii=False, separators=(",", ":")),
    }
    if artifact.name is not None:
        metadata["name"] = artifact.name
    if artifact.description is not None:
        metadata["description"] = artifact.description
    if artifact.train_summary is not None:
        metadata["train_summary"] = encode_summary(artifact.train_summary)
    for key in sorted(artifact.extra_metadata):
        metadata[key] = artifact.extra_metadata[key]

    code = DTYPE_CODES[artifact.prompts.dtype]
    data = encode(
        ((name, code, tuple(t.shape), _tensor_bytes(t)) for name, t in converted.items()),
        metadata,
    )
    read_metadata(data, limits)  # header size and total size limits; proof the header reads back
    return data


def write_artifact(
    artifact: TaskArtifact,
    path: str | os.PathLike[str],
    dtype: torch.dtype | None = None,
    *,
    limits: ArtifactLimits | None = None,
) -> None:
    """`save_artifact` to a file, atomically: a temp file in the same directory, fsynced, then renamed.

    A reader (or a crash) sees the old file or the new one, never a torn one. Directory fsync and
    versioning are the store's business.
    """
    atomic_write(path, save_artifact(artifact, dtype, limits=limits))


def atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same directory, fsynced, then renamed, so a reader
    (or a crash) sees the old file or the new one, never a torn one. Creates missing parent folders."""
    path = os.fspath(path)
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------------------
# Compatibility with a running backbone


def _abbrev(text: str, keep: int = 16) -> str:
    return repr(text) if len(text) <= keep else repr(text[:keep]) + "..."


def validate_for_backbone(meta_or_artifact: TaskArtifact | ArtifactMetadata, sig: BackboneSignature) -> None:
    """Refuse a task that does not fit the running backbone: width, deep depth, then exact weights.

    Prompts are tokens in the backbone's own embedding space and the head reads its CLS feature, so a
    task is only meaningful on the frozen weights it was tuned on (VPT keeps the backbone frozen).
    Width and depth are checked first because their messages say more than a hash mismatch does.
    """
    a = meta_or_artifact
    if isinstance(a, TaskArtifact):
        layers, _, dim = (int(s) for s in a.prompts.shape)
    else:
        layers, _, dim = a.prompt_shape
    if dim != sig.embed_dim:
        raise ArtifactError(
            PROMPTS, f"embedding width D={dim} does not match the backbone's embed_dim={sig.embed_dim}"
        )
    if a.mode == "deep" and layers != sig.depth:
        raise ArtifactError(
            PROMPTS,
            f"VPT-deep needs one prompt set per layer: the task has {layers}, the backbone has depth {sig.depth}",
        )
    if a.backbone_fingerprint != sig.fingerprint:
        raise ArtifactError(
            "backbone_fingerprint",
            f"the task was trained on backbone {a.backbone!r} with fingerprint {_abbrev(a.backbone_fingerprint)}, "
            f"this server runs {sig.backbone_id or 'a backbone'!r} with fingerprint {_abbrev(sig.fingerprint)}",
        )
