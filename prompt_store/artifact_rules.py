"""Rules of task artifact format v1 (`vpt-task/1`) shared by the reader and the writer.

The reader applies them to header values, the writer to in-memory tensors, so the two cannot drift
apart: whatever `save_artifact` writes, `load_artifact` accepts. Semantics follow VPT (Jia et al.,
ECCV 2022, arXiv 2203.12119, Sec. 3.2): shallow prompts enter before layer 0 only, deep prompts
before every layer; a linear head reads the final CLS feature. docs/artifact-format.md lists every
rule and the `ArtifactError.field` it reports.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from prompt_store.artifact_header import METADATA_KEY, short
from prompt_store.errors import ArtifactError

FORMAT = "vpt-task/1"  # what this writer writes
FORMAT_MAJOR = 1  # what this reader accepts: "vpt-task/1" and any "vpt-task/1.<minor>"
# Bounded digit runs: int() of a 100k-digit version string would be slow (and errors on 3.11+).
_FORMAT_RE = re.compile(r"vpt-task/([0-9]{1,9})(?:\.([0-9]{1,9}))?")

PROMPTS, HEAD_WEIGHT, HEAD_BIAS = "prompts", "head.weight", "head.bias"
TENSOR_NAMES = (PROMPTS, HEAD_WEIGHT, HEAD_BIAS)  # also the order of the data section when we write
MODES = ("shallow", "deep")
REQUIRED_METADATA = ("format", "mode", "backbone", "backbone_fingerprint", "labels")
OPTIONAL_METADATA = ("name", "description", "train_summary")
RESERVED_METADATA = frozenset(REQUIRED_METADATA + OPTIONAL_METADATA)

# safetensors dtype code -> torch dtype. Float only: prompts and heads are learned real weights, and
# F32/F16/BF16 are what a serving GPU computes in. Integer/float8 codes are refused, not converted.
DTYPES: dict[str, torch.dtype] = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
DTYPE_CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
ITEMSIZES: dict[str, int] = {code: dt.itemsize for code, dt in DTYPES.items()}


@dataclass(frozen=True)
class ArtifactLimits:
    """Upper bounds applied when reading (and writing) artifacts; the server takes them from Settings."""

    max_bytes: int = 64 * 1024 * 1024  # whole file, header included
    max_prompt_length: int = 512  # P, prompt tokens per layer (the paper sweeps P up to 200)
    max_classes: int = 100_000  # C
    max_header_bytes: int = 1 * 1024 * 1024  # the JSON header (labels live here, so it bounds label text)

    def __post_init__(self) -> None:
        if (
            self.max_bytes < 1
            or self.max_classes < 1
            or self.max_header_bytes < 2
            or self.max_prompt_length < 0
        ):
            raise ValueError(f"invalid artifact limits: {self}")


def check_mode(mode: Any) -> None:
    if mode not in MODES:
        shown = short(mode) if isinstance(mode, str) else type(mode).__name__
        raise ArtifactError("mode", f"must be 'shallow' or 'deep', got {shown}")


def check_shapes(
    mode: str,
    prompts: tuple[int, ...],
    weight: tuple[int, ...],
    bias: tuple[int, ...],
    limits: ArtifactLimits,
) -> None:
    if len(prompts) != 3:
        raise ArtifactError(PROMPTS, f"must be 3-D (L_p, P, D), got shape {list(prompts)}")
    layers, plen, dim = prompts
    if layers < 1:
        raise ArtifactError(PROMPTS, "needs at least one prompt layer (L_p >= 1)")
    if dim < 1:
        raise ArtifactError(PROMPTS, "embedding width D must be >= 1")
    if plen > limits.max_prompt_length:
        raise ArtifactError(
            PROMPTS, f"prompt length P={plen} exceeds the limit of {limits.max_prompt_length}"
        )
    if mode == "shallow" and layers != 1:
        # VPT-shallow inserts prompts before layer 0 only (paper Sec. 3.2), so it has exactly one set.
        raise ArtifactError("mode", f"'shallow' needs prompts with L_p = 1 layer, got {layers}")
    if mode == "deep" and plen == 0:
        # One canonical linear probe: otherwise (1, 0, D) shallow and (L, 0, D) deep are the same task.
        raise ArtifactError(
            "mode", "a linear probe (P = 0) must be stored as mode 'shallow' with prompts (1, 0, D)"
        )
    if len(weight) != 2:
        raise ArtifactError(HEAD_WEIGHT, f"must be 2-D (C, D), got shape {list(weight)}")
    classes, head_dim = weight
    if classes < 1:
        raise ArtifactError(HEAD_WEIGHT, "needs at least one class (C >= 1)")
    if classes > limits.max_classes:
        raise ArtifactError(HEAD_WEIGHT, f"C={classes} classes exceeds the limit of {limits.max_classes}")
    if head_dim != dim:
        raise ArtifactError(HEAD_WEIGHT, f"width {head_dim} does not match the prompts' D={dim}")
    if tuple(bias) != (classes,):
        raise ArtifactError(HEAD_BIAS, f"must have shape [{classes}] (one bias per class), got {list(bias)}")


def check_text(key: str, value: Any, *, required: bool) -> None:
    if value is None and not required:
        return
    if not isinstance(value, str):
        raise ArtifactError(key, f"must be a string, got {type(value).__name__}")
    if required and not value:
        raise ArtifactError(key, "must not be empty")


def check_labels(labels: Any, num_classes: int) -> None:
    if not isinstance(labels, list):
        raise ArtifactError("labels", f"must be a JSON list of strings, got {type(labels).__name__}")
    if len(labels) != num_classes:
        raise ArtifactError("labels", f"has {len(labels)} entries but the head has C={num_classes} classes")
    for i, label in enumerate(labels):
        if not isinstance(label, str):
            raise ArtifactError("labels", f"entry {i} must be a string, got {type(label).__name__}")


def encode_summary(summary: Any) -> str:
    if not isinstance(summary, dict):
        raise ArtifactError("train_summary", f"must be a JSON object (dict), got {type(summary).__name__}")
    try:
        # sort_keys: equal summaries give equal bytes; allow_nan=False: the API must be able to echo it.
        return json.dumps(summary, sort_keys=True, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise ArtifactError("train_summary", f"is not JSON-serialisable without NaN/Inf ({e})") from None
    except RecursionError:
        raise ArtifactError("train_summary", "is nested too deeply") from None


def check_extra(extra: Any) -> None:
    if not isinstance(extra, Mapping):
        raise ArtifactError(METADATA_KEY, f"extra_metadata must be a dict, got {type(extra).__name__}")
    for key, value in extra.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ArtifactError(METADATA_KEY, f"extra_metadata entry {key!r} must map a string to a string")
        if key in RESERVED_METADATA:
            raise ArtifactError(key, "is a format key; set the TaskArtifact field, not extra_metadata")


def check_finite(name: str, tensor: torch.Tensor) -> None:
    if tensor.numel() == 0:
        return
    # Fast path: one reduction; min/max are NaN if any element is NaN and ±inf if any is infinite.
    # (20x cheaper than materialising isfinite() on MB-sized tensors; the slow path only names the index.)
    # Native for bf16 too (a .float() copy first cost 3x the reduction: cold-load benchmark).
    lo, hi = torch.aminmax(tensor.detach())
    if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
        return
    bad = ~torch.isfinite(tensor)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ArtifactError(name, f"has {int(bad.sum())} non-finite values (NaN/Inf), first at index {first}")


def check_format(table: Mapping[str, str]) -> None:
    fmt = table.get("format")
    if fmt is None:
        raise ArtifactError("format", f"missing: not a VPT task artifact (expected format {FORMAT!r})")
    match = _FORMAT_RE.fullmatch(fmt)
    if match is None:
        raise ArtifactError("format", f"unknown format {short(fmt)}; expected {FORMAT!r}")
    major = int(match.group(1))
    if major != FORMAT_MAJOR:
        raise ArtifactError(
            "format",
            f"unsupported artifact format version {major} ({fmt!r}); this reader understands {FORMAT!r} "
            f"(major version {FORMAT_MAJOR}) only; upgrade the reader",
        )
