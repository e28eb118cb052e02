"""What crosses between the scheduler and an executor, and the forward pass every executor runs.

An `EngineBatch` (host-planned: images, bank slots, the slots' host facts, what to output) goes in; an
`EngineResult` (host tensors) comes out. `forward` is one mixed-task batch on the device: each sample
reads its own slot's prompts and head (VPT, Jia et al. 2022, Sec. 3.2), so its result is the same in
any batch; deep tasks' prompts enter as per-layer keys/values (`vpt.prompts.PromptKV`), shallow
tasks' as tokens (`batch_features`). Every executor (`server/engine/executors.py`) and the engine
process's child (`server/engine/process.py`) import this module; none imports another executor.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import torch

from vpt.prompts import HeadBatch, PromptBatch, PromptKV
from vpt.vit import VisionTransformer

if TYPE_CHECKING:
    from server.engine.bank import SlotInfo
    from server.engine.graphs import FeatureGraphs

Output = Literal["classify", "embed"]


@dataclass
class EngineBatch:
    """One forward pass worth of work, planned on the host."""

    images: torch.Tensor  # (B, 3, H, W) uint8 on the host (pinned on CUDA)
    slots: list[int]  # (B,) bank slot per sample
    infos: list[SlotInfo]  # (B,) host facts of each slot (lengths, modes, classes)
    output: Output  # "classify" → top-k probabilities; "embed" → CLS features
    top_k: int = 5  # classify only: k for the whole batch (requests slice their own k)


@dataclass
class EngineResult:
    """Host tensors for one batch."""

    scores: torch.Tensor | None  # (B, k) softmax probabilities, descending (classify)
    indices: torch.Tensor | None  # (B, k) class indices (classify)
    features: torch.Tensor | None  # (B, D) float32 CLS features (embed)
    compute_s: float  # wall time from launch to results on the host


class BankTables(Protocol):
    """The bank's device tables a forward pass reads (a `PromptBank`, or their shared-memory views in
    the engine process)."""

    prompts: torch.Tensor  # (S, 1, Pmax, D) shallow tasks' prompt tokens
    prompt_kv: torch.Tensor  # (S, L, Pmax, 2D) deep tasks' prompt keys/values
    head_weight: torch.Tensor  # (S, Cmax, D)
    head_bias: torch.Tensor  # (S, Cmax)


def feature_forward(model: VisionTransformer, compile: bool) -> Callable[..., torch.Tensor]:
    """The backbone's feature forward (`VisionTransformer.forward_features`), `torch.compile`d or not."""
    # dynamic=True: batch size and prompt length vary from batch to batch.
    return torch.compile(model.forward_features, dynamic=True) if compile else model.forward_features


@torch.inference_mode()  # on whichever thread runs it (an executor's own)
def warm_features(
    model: VisionTransformer, features: Callable[..., torch.Tensor], bank: BankTables, batch_size: int
) -> None:
    """The plain forward and the deep one (prompts as keys/values, over one slot of slot 0: zeros or a
    task, only read) once at this batch size: kernel selection, compile, allocator."""
    S = model.cfg.img_size
    x = model.normalize(torch.zeros(batch_size, 3, S, S, dtype=torch.uint8, device=model.pos_embed.device))
    model.pool(features(x, None, cls_only=True))
    if bank.prompt_kv.shape[2]:
        index = torch.zeros(batch_size, dtype=torch.long)
        model.pool(
            features(x, None, kv=PromptKV.build(bank.prompt_kv, index, [1] * batch_size), cls_only=True)
        )


def forward(
    model: VisionTransformer,
    features: Callable[..., torch.Tensor],
    bank: BankTables,
    images: torch.Tensor,
    batch: EngineBatch,
    between_blocks: Callable[[], None] | None = None,
    graphs: FeatureGraphs | None = None,
) -> tuple[torch.Tensor, ...]:
    """One mixed-task batch on `images`' device: (top-k scores, indices) or (CLS features,), as device
    tensors. Each sample reads its own slot's prompts and head (VPT, Jia et al. 2022, Sec. 3.2), so its
    result is the same in any batch. `graphs`: replay a captured CUDA graph when one fits."""
    cuda = images.device.type == "cuda"
    x = model.normalize(images)  # (B, 3, H, W) in the model dtype
    index = torch.tensor(batch.slots, dtype=torch.long).to(images.device, non_blocking=cuda)
    feats = batch_features(model, features, bank, x, batch, index, between_blocks, graphs)  # (B, D)
    if batch.output == "embed":
        return (feats.float(),)
    classes = [i.num_classes for i in batch.infos]
    c_max = max(classes)
    heads = HeadBatch(
        weight=bank.head_weight[:, :c_max],
        bias=bank.head_bias[:, :c_max],
        index=index,
        num_classes=None
        if min(classes) == c_max
        else torch.tensor(classes, dtype=torch.long).to(images.device, non_blocking=cuda),
    )
    probs = heads(feats).float().softmax(dim=-1)  # (B, C) — padded classes score exactly 0
    scores, indices = probs.topk(min(batch.top_k, c_max), dim=-1)  # (B, k)
    return scores, indices


def batch_features(
    model: VisionTransformer,
    features: Callable[..., torch.Tensor],
    bank: BankTables,
    x: torch.Tensor,
    batch: EngineBatch,
    index: torch.Tensor,
    between_blocks: Callable[[], None] | None = None,
    graphs: FeatureGraphs | None = None,
    split: bool | None = None,
) -> torch.Tensor:
    """(B, D) CLS features of normalised images `x` (`index`: their slots on the device). A batch
    mixing shallow and deep tasks runs as two sub-batches when that saves work (`split_modes`; `split`
    overrides it, for benchmarks): there a deep sample's sequence is CLS + patches, a shallow one's
    carries its prompt tokens."""
    deep = [i.deep for i in batch.infos]
    lengths = [i.prompt_length for i in batch.infos]
    if split is None:
        split = split_modes(deep, lengths, x.device)
    if not split or all(deep) or not any(deep):
        return _features(model, features, bank, x, batch.slots, index, lengths, deep, between_blocks, graphs)
    cuda = x.device.type == "cuda"
    out = torch.empty(x.shape[0], model.cfg.embed_dim, dtype=x.dtype, device=x.device)
    for kind in (True, False):
        rows = [j for j, d in enumerate(deep) if d == kind]
        at = torch.tensor(rows, dtype=torch.long).to(x.device, non_blocking=cuda)
        part = _features(
            model,
            features,
            bank,
            x.index_select(0, at),
            [batch.slots[j] for j in rows],
            index.index_select(0, at),
            [lengths[j] for j in rows],
            [kind] * len(rows),
            between_blocks,
            graphs,
        )
        # Copied out at once: a graph's output buffer may be reused by the next replay.
        out.index_copy_(0, at, part)
        if kind and between_blocks is not None:
            between_blocks()
    return out


def split_modes(deep: list[bool], lengths: list[int], device: torch.device) -> bool:
    """Run a batch mixing shallow and deep tasks as two sub-batches? In one forward every deep sample
    carries the shallow samples' prompt positions (masked: they change no result, but are computed);
    split, every op runs twice. Split when the positions saved, deep samples x the longest shallow
    prompt, outweigh a second pass: on CPU from 64 (measured, docs/benchmarks.md "Deep prompts as
    keys/values"); on CUDA, where a pass of a small batch costs its kernel launches, from 2,048."""
    shallow = [n for n, d in zip(lengths, deep, strict=True) if not d]
    if not shallow or len(shallow) == len(deep):
        return False
    saved = (len(deep) - len(shallow)) * max(shallow)
    return saved >= SPLIT_MODES_SAVED[device.type == "cuda"]


SPLIT_MODES_SAVED = {False: 64, True: 2048}  # prompt positions; by "on CUDA"


def _features(
    model: VisionTransformer,
    features: Callable[..., torch.Tensor],
    bank: BankTables,
    x: torch.Tensor,
    slots: list[int],
    index: torch.Tensor,
    lengths: list[int],
    deep: list[bool],
    between_blocks: Callable[[], None] | None,
    graphs: FeatureGraphs | None,
) -> torch.Tensor:
    """(n, D) CLS features: shallow samples' prompts as tokens, deep ones' as keys/values."""
    # A graph replay returns its output buffer: the caller reads it before a later replay.
    feats = graphs.run(x, slots, lengths, deep) if graphs is not None else None
    if feats is not None:
        return feats
    tokens = [0 if d else n for n, d in zip(lengths, deep, strict=True)]
    kv = [n if d else 0 for n, d in zip(lengths, deep, strict=True)]
    prompts = PromptBatch.build(bank.prompts, index, tokens, [False] * len(tokens)) if any(tokens) else None
    keys = PromptKV.build(bank.prompt_kv, index, kv) if any(kv) else None
    # cls_only: the head reads CLS alone, so the last block computes nothing else.
    return model.pool(features(x, prompts, between_blocks, kv=keys, cls_only=True))


def stage_images(parts: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Requests' uint8 image tensors → one batch: in pinned host memory for a CUDA engine (its launch
    copies it without blocking), or on the device when GPU decoding already put some parts there."""
    if len({t.device for t in parts}) > 1:
        # With VPT_GPU_DECODE some requests' images arrive on the device, others (not JPEG) on the
        # host: torch.cat needs one device. Pinned, non-blocking: a pageable copy would block the
        # event loop until the engine's queued batches finish.
        pin = device.type == "cuda"
        parts = [
            (t.pin_memory() if pin and t.device.type == "cpu" else t).to(device, non_blocking=True)
            for t in parts
        ]
    images = torch.cat(parts) if len(parts) > 1 else parts[0]
    if device.type == "cuda" and images.device.type == "cpu":
        images = images.pin_memory()
    return images


def result(out: tuple[torch.Tensor, ...], output: Output, started: float) -> EngineResult:
    """`forward`'s outputs, on the host, as an `EngineResult` timed from `started` (perf_counter)."""
    elapsed = time.perf_counter() - started
    if output == "embed":
        return EngineResult(scores=None, indices=None, features=out[0], compute_s=elapsed)
    scores, indices = out
    return EngineResult(scores=scores, indices=indices, features=None, compute_s=elapsed)
