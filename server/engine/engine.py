"""The inference engine: one frozen ViT on one device plus the prompt bank.

Contract (no asyncio, no HTTP): uint8 images (B, 3, H, W) + bank slot indices (B,) in, logits top-k or
CLS features out. A batch may mix tasks, prompt lengths, VPT modes and class counts; every sample's
result equals its solo result (the invariant DESIGN.md asks for), because prompts are gathered per sample
and padded prompt keys are masked (see `vpt.vit`).

The scheduler calls `launch` from one engine thread and, on CUDA, `collect` from another. On CUDA
`launch` only enqueues kernels (nothing in it waits for the device), so the engine thread can launch
batch k+1 while batch k still computes; on CPU it computes at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from prompt_store.artifact import BackboneSignature, TaskArtifact
from server.engine.bank import PromptBank, SlotInfo, TaskKey
from server.engine.graphs import FeatureGraphs
from vpt.hub import Backbone
from vpt.prompts import HeadBatch, PromptBatch

log = logging.getLogger(__name__)

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


@dataclass
class _Pending:
    out: tuple[torch.Tensor, ...]
    output: Output
    started: float
    event: torch.cuda.Event | None


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, not {name!r}") from None


class Engine:
    def __init__(
        self,
        backbone: Backbone,
        *,
        bank_slots: int,
        max_prompt_length: int,
        max_classes: int,
        bank_bytes: int | None = None,
        compile: bool = False,
        cuda_graph_max_batch: int = 0,
        fault_oom_over: int = 0,
        fault_fail_every: int = 0,
    ) -> None:
        self.backbone = backbone
        # Test hooks (issue D, faults): simulate device OOM on large batches / a failing batch.
        self._fault_oom_over, self._fault_fail_every = fault_oom_over, fault_fail_every
        self._launched = 0
        self.cfg = backbone.cfg
        self.model = backbone.model
        self.device = self.model.pos_embed.device
        self.dtype = self.model.pos_embed.dtype
        self.bank = PromptBank(
            depth=self.cfg.depth,
            embed_dim=self.cfg.embed_dim,
            max_slots=bank_slots,
            max_prompt_length=max_prompt_length,
            max_classes=max_classes,
            device=self.device,
            dtype=self.dtype,
            byte_budget=bank_bytes,
        )
        self._features = self.model.forward_features
        self.compiled = compile
        if compile:
            # dynamic=True: batch size and prompt length vary from batch to batch.
            self._features = torch.compile(self.model.forward_features, dynamic=True)
        # CUDA graphs for batches up to this size (captured in `warmup`; see server/engine/graphs.py).
        self.cuda_graph_max_batch = cuda_graph_max_batch
        self.graphs: FeatureGraphs | None = None
        self.ready = False

    @property
    def signature(self) -> BackboneSignature:
        return BackboneSignature(
            embed_dim=self.cfg.embed_dim,
            depth=self.cfg.depth,
            fingerprint=self.backbone.fingerprint,
            backbone_id=self.backbone.backbone_id,
        )

    def install(self, key: TaskKey, artifact: TaskArtifact) -> int:
        """Copy a validated task into a bank slot (engine thread)."""
        return self.bank.install(key, artifact)

    def _inject_faults(self, batch: EngineBatch) -> None:
        self._launched += 1
        if self._fault_oom_over and len(batch.slots) > self._fault_oom_over:
            raise torch.OutOfMemoryError(f"injected: batch of {len(batch.slots)} > {self._fault_oom_over}")
        if self._fault_fail_every and self._launched % self._fault_fail_every == 0:
            raise RuntimeError(f"injected engine failure on batch {self._launched}")

    @torch.inference_mode()
    def launch(self, batch: EngineBatch, between_blocks: Callable[[], None] | None = None) -> _Pending:
        """Start a batch (on CPU: compute it). `between_blocks` runs after each transformer block but
        the last (the scheduler's preemption point on CPU; never given with a compiled backbone:
        `Settings.effective_preempt`)."""
        if self._fault_oom_over or self._fault_fail_every:
            self._inject_faults(batch)
        started = time.perf_counter()
        cuda = self.device.type == "cuda"
        images = batch.images.to(self.device, non_blocking=cuda)
        x = self.model.normalize(images)  # (B, 3, H, W) in the model dtype
        index = torch.tensor(batch.slots, dtype=torch.long).to(self.device, non_blocking=cuda)
        lengths = [i.prompt_length for i in batch.infos]
        deep = [i.deep for i in batch.infos]
        # A graph replay when one fits; `feats` is then its output buffer, read below on this stream
        # before any later replay can overwrite it.
        feats = self.graphs.run(x, batch.slots, lengths, deep) if self.graphs is not None else None
        if feats is None:
            prompts = PromptBatch.build(self.bank.prompts, index, lengths, deep)
            feats = self.model.pool(self._features(x, prompts, between_blocks))  # (B, D)
        if batch.output == "embed":
            out: tuple[torch.Tensor, ...] = (feats.float().to("cpu", non_blocking=cuda),)
        else:
            classes = [i.num_classes for i in batch.infos]
            c_max = max(classes)
            heads = HeadBatch(
                weight=self.bank.head_weight[:, :c_max],
                bias=self.bank.head_bias[:, :c_max],
                index=index,
                num_classes=None
                if min(classes) == c_max
                else torch.tensor(classes, dtype=torch.long).to(self.device, non_blocking=cuda),
            )
            probs = heads(feats).float().softmax(dim=-1)  # (B, C) — padded classes score exactly 0
            scores, indices = probs.topk(min(batch.top_k, c_max), dim=-1)  # (B, k)
            out = (scores.to("cpu", non_blocking=cuda), indices.to("cpu", non_blocking=cuda))
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        return _Pending(out=out, output=batch.output, started=started, event=event)

    def collect(self, pending: _Pending) -> EngineResult:
        if pending.event is not None:
            pending.event.synchronize()
        elapsed = time.perf_counter() - pending.started
        if pending.output == "embed":
            return EngineResult(scores=None, indices=None, features=pending.out[0], compute_s=elapsed)
        scores, indices = pending.out
        return EngineResult(scores=scores, indices=indices, features=None, compute_s=elapsed)

    def release_cached_memory(self) -> None:
        """After an out-of-memory error: give cached blocks back before retrying smaller batches."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def run(self, batch: EngineBatch, between_blocks: Callable[[], None] | None = None) -> EngineResult:
        return self.collect(self.launch(batch, between_blocks))

    def warmup(self, batch_sizes: tuple[int, ...] = (1, 8)) -> None:
        """Run the plain backbone once per batch size (kernel selection, compile, allocator)."""
        s = self.cfg.img_size
        t0 = time.perf_counter()
        with torch.inference_mode():
            for b in batch_sizes:
                x = self.model.normalize(torch.zeros(b, 3, s, s, dtype=torch.uint8, device=self.device))
                self.model.pool(self._features(x, None))
        if self.device.type == "cuda" and self.cuda_graph_max_batch > 0:
            if self.compiled:
                # Not worth a warning: graphs are on by default, and a compiled backbone runs without them.
                log.info("CUDA graphs are off: the backbone is compiled (torch.compile)")
            else:
                graphs = FeatureGraphs(self.model, self.bank.prompts, self.cuda_graph_max_batch, capture=True)
                try:
                    graphs.prepare()
                    self.graphs = graphs
                except RuntimeError as e:  # a failed capture or check: serve eagerly, loudly
                    # A capture that fails on exit leaves its stream current in this thread.
                    torch.cuda.set_stream(torch.cuda.default_stream(self.device))
                    log.error("CUDA graphs are off: %s", e)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        log.info("engine warm-up done in %.2fs (batch sizes %s)", time.perf_counter() - t0, batch_sizes)
        self.ready = True
