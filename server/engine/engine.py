"""The inference engine: one frozen ViT on one device plus the prompt bank.

Contract (no asyncio, no HTTP): uint8 images (B, 3, H, W) + bank slot indices (B,) in, logits top-k or
CLS features out. A batch may mix tasks, prompt lengths, VPT modes and class counts; every sample's
result equals its solo result (the invariant DESIGN.md asks for), because prompts are gathered per sample
and padded prompt keys are masked (see `vpt.vit`). Deep tasks' prompts enter as per-layer keys/values
(`vpt.prompts.PromptKV`), shallow tasks' as tokens (`batch_features`).

The scheduler calls `launch` from one engine thread and, on CUDA, `collect` from another. On CUDA
`launch` only enqueues kernels (nothing in it waits for the device), so the engine thread can launch
batch k+1 while batch k still computes; on CPU it computes at once, in this process or (the default,
`process=`) in an engine process of its own, to which `submit` sends a batch without waiting
(`server/engine/process.py`). Both run the same `forward`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

import torch

from prompt_store.artifact import BackboneSignature, TaskArtifact
from server.engine.bank import PromptBank, SlotInfo, TaskKey
from server.engine.faults import Faults
from server.engine.graphs import FeatureGraphs
from server.engine.process import EngineProcess, ProcessConfig, check_shared_memory, shared_bytes
from vpt.hub import Backbone
from vpt.prompts import HeadBatch, PromptBatch, PromptKV
from vpt.vit import VisionTransformer

log = logging.getLogger(__name__)
T = TypeVar("T")

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
    out: tuple[torch.Tensor, ...] | Future[tuple[torch.Tensor, ...]]  # a Future: the engine process's
    output: Output
    started: float
    event: torch.cuda.Event | None


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


def warm_features(
    model: VisionTransformer, features: Callable[..., torch.Tensor], bank: BankTables, batch_size: int
) -> None:
    """The plain forward and the deep one (prompts as keys/values, over one slot of slot 0: zeros or a
    task, only read) once at this batch size: kernel selection, compile, allocator."""
    S = model.cfg.img_size
    x = model.normalize(torch.zeros(batch_size, 3, S, S, dtype=torch.uint8, device=model.pos_embed.device))
    model.pool(features(x, None))
    if bank.prompt_kv.shape[2]:
        index = torch.zeros(batch_size, dtype=torch.long)
        model.pool(features(x, None, kv=PromptKV.build(bank.prompt_kv, index, [1] * batch_size)))


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
    return model.pool(features(x, prompts, between_blocks, kv=keys))


def _resolve(fut: Future[T], compute: Callable[[], T]) -> None:
    try:
        fut.set_result(compute())
    except Exception as e:
        fut.set_exception(e)


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
        process: ProcessConfig | None = None,
    ) -> None:
        """`process`: compute in an engine process of its own (CPU; `server/engine/process.py`)."""
        self.backbone = backbone
        self._faults = Faults(fault_oom_over, fault_fail_every)  # test hooks
        self.cfg = backbone.cfg
        self.model = backbone.model
        self.device = self.model.pos_embed.device
        self.dtype = self.model.pos_embed.dtype
        if process is not None:
            if self.device.type != "cpu":
                raise ValueError("the engine process is for CPU engines (on CUDA the device computes)")
            # Before the bank takes its share: running out of /dev/shm later is a SIGBUS, not an error.
            slots, slot_bytes = PromptBank.plan(
                self.cfg.depth,
                self.cfg.embed_dim,
                bank_slots,
                max_prompt_length,
                max_classes,
                self.dtype,
                bank_bytes,
            )
            check_shared_memory(shared_bytes(self.model, slots * slot_bytes, max_classes, process))
        self.bank = PromptBank(
            depth=self.cfg.depth,
            embed_dim=self.cfg.embed_dim,
            prompt_kv=self.model.prompt_kv,
            max_slots=bank_slots,
            max_prompt_length=max_prompt_length,
            max_classes=max_classes,
            device=self.device,
            dtype=self.dtype,
            byte_budget=bank_bytes,
            shared=process is not None,
        )
        self._features = feature_forward(self.model, compile)
        self.compiled = compile
        # CUDA graphs for batches up to this size (captured in `warmup`; see server/engine/graphs.py).
        self.cuda_graph_max_batch = cuda_graph_max_batch
        self.graphs: FeatureGraphs | None = None
        self._warm = False
        # Batches handed over by `overtake`, run between blocks of the preemptible batch computing now.
        self._inbox: list[tuple[EngineBatch, Future[EngineResult]]] = []
        self._inbox_lock = threading.Lock()
        self.process: EngineProcess | None = None
        if process is not None:
            self.process = EngineProcess(self.model, self.bank, process, compile=compile, faults=self._faults)

    @property
    def ready(self) -> bool:
        """Warmed up, and its engine process (if any) alive."""
        return self._warm and self.alive

    @property
    def alive(self) -> bool:
        """False once the engine process has died: nothing can compute (liveness fails)."""
        return self.process is None or self.process.alive

    def close(self) -> None:
        """Stop the engine process (if any); in-process engines hold nothing to release."""
        if self.process is not None:
            self.process.close()

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

    @torch.inference_mode()
    def launch(self, batch: EngineBatch, preemptible: bool = False) -> _Pending:
        """Start a batch (on CPU: compute it, here or in the engine process). `preemptible`: batches
        handed to `overtake` meanwhile run between two of its transformer blocks (CPU only; never with
        a compiled backbone: `Settings.effective_preempt`)."""
        started = time.perf_counter()
        if self.process is not None:  # which counts the test hooks' faults itself
            return _Pending(self.process.submit(batch, preemptible), batch.output, started, None)
        if self._faults:
            self._faults.check(len(batch.slots))
        cuda = self.device.type == "cuda"
        out = forward(
            self.model,
            self._features,
            self.bank,
            batch.images.to(self.device, non_blocking=cuda),
            batch,
            between_blocks=self.serve_overtakers if preemptible else None,
            graphs=self.graphs,
        )
        out = tuple(t.to("cpu", non_blocking=cuda) for t in out)
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        return _Pending(out, batch.output, started, event)

    def collect(self, pending: _Pending) -> EngineResult:
        if isinstance(pending.out, Future):
            out = pending.out.result()
        else:
            if pending.event is not None:
                pending.event.synchronize()
            out = pending.out
        elapsed = time.perf_counter() - pending.started
        if pending.output == "embed":
            return EngineResult(scores=None, indices=None, features=out[0], compute_s=elapsed)
        scores, indices = out
        return EngineResult(scores=scores, indices=indices, features=None, compute_s=elapsed)

    def run(self, batch: EngineBatch, preemptible: bool = False) -> EngineResult:
        """Compute a batch (engine thread). A preemptible one runs what `overtake` hands over at its
        block boundaries."""
        return self.collect(self.launch(batch, preemptible))

    def overtake(self, batch: EngineBatch) -> Future[EngineResult]:
        """Hand over a batch to run at the next block boundary of the preemptible batch computing now
        (any thread). One handed over after the last boundary runs at the next `serve_overtakers`,
        which the caller must then submit to the engine thread (the engine process instead runs it
        next on its own: its pipe is FIFO)."""
        if self.process is not None:
            return self.submit(batch)
        fut: Future[EngineResult] = Future()
        with self._inbox_lock:
            self._inbox.append((batch, fut))
        return fut

    def submit(self, batch: EngineBatch, preemptible: bool = False) -> Future[EngineResult]:
        """Engine process only: send a batch without waiting for it (any thread, the event loop too:
        it copies the images and writes one message); the Future resolves with its result."""
        assert self.process is not None
        fut: Future[EngineResult] = Future()
        pending = self.launch(batch, preemptible)  # with an engine process: sent, not waited for
        pending.out.add_done_callback(lambda _: _resolve(fut, lambda: self.collect(pending)))  # type: ignore[union-attr]
        return fut

    def serve_overtakers(self) -> None:
        """Engine thread: run the batches handed over and not run yet (an overtaker is not itself
        preempted). Between two blocks of a preemptible batch, and after it."""
        while True:
            with self._inbox_lock:
                if not self._inbox:
                    return
                batch, fut = self._inbox.pop(0)
            _resolve(fut, lambda b=batch: self.run(b))  # type: ignore[misc]

    def release_cached_memory(self) -> None:
        """After an out-of-memory error: give cached blocks back before retrying smaller batches."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def warmup(self, batch_sizes: tuple[int, ...] = (1, 8)) -> None:
        """Run both feature forwards once per batch size (kernel selection, compile, allocator)."""
        t0 = time.perf_counter()
        if self.process is not None:
            self.process.warmup(batch_sizes)
            batch_sizes = ()  # this process computes nothing
        with torch.inference_mode():
            for b in batch_sizes:
                warm_features(self.model, self._features, self.bank, b)
        if self.device.type == "cuda" and self.cuda_graph_max_batch > 0:
            if self.compiled:
                # Not worth a warning: graphs are on by default, and a compiled backbone runs without them.
                log.info("CUDA graphs are off: the backbone is compiled (torch.compile)")
            else:
                graphs = FeatureGraphs(self.model, self.bank, self.cuda_graph_max_batch, capture=True)
                try:
                    graphs.prepare()
                    self.graphs = graphs
                except RuntimeError as e:  # a failed capture or check: serve eagerly, loudly
                    # A capture that fails on exit leaves its stream current in this thread.
                    torch.cuda.set_stream(torch.cuda.default_stream(self.device))
                    log.error("CUDA graphs are off: %s", e)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        log.info("engine warm-up done in %.2fs", time.perf_counter() - t0)
        self._warm = True
