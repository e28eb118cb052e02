"""The inference engine: one frozen ViT on one device, the prompt bank, and the executor that runs
batches — the one interface the scheduler uses.

Contract (no asyncio, no HTTP): `submit(EngineBatch) -> Future[EngineResult]` (uint8 images + bank slots
in; top-k probabilities or CLS features out), `preempt(EngineBatch)` for a batch that may run between two
blocks of the preemptible one computing now, `submit_install` for a task's copy into the bank, `stage`
for a batch's images. A batch may mix tasks, prompt lengths, VPT modes and class counts; every sample's
result equals its solo result (the invariant DESIGN.md asks for; `server/engine/batch.py`).

The executor is chosen once, here (`server/engine/executors.py`): the engine process on CPU (the
server's default, `process=`), one engine thread in this process on CPU otherwise, a launch and a
collect thread on CUDA (with CUDA graphs for small batches).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future

import torch

from prompt_store.artifact import BackboneSignature, TaskArtifact
from server.engine.bank import PromptBank, TaskKey
from server.engine.batch import EngineBatch, EngineResult, feature_forward, stage_images, warm_features
from server.engine.executors import CudaExecutor, Executor, InProcessExecutor, ProcessExecutor
from server.engine.faults import Faults
from server.engine.graphs import FeatureGraphs
from server.engine.process import EngineProcess, ProcessConfig, check_shared_memory, shared_bytes
from vpt.hub import Backbone

log = logging.getLogger(__name__)


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
        engine_cpus: frozenset[int] = frozenset(),
    ) -> None:
        """`process`: compute in an engine process of its own (CPU; `server/engine/process.py`).
        `engine_cpus`: pin the engine thread (in-process and CUDA executors) to these CPUs."""
        self.backbone = backbone
        faults = Faults(fault_oom_over, fault_fail_every)  # test hooks
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
        self._warm = False
        self.executor: Executor
        if process is not None:
            proc = EngineProcess(self.model, self.bank, process, compile=compile, faults=faults)
            self.executor = ProcessExecutor(proc)
        elif self.device.type == "cuda":
            self.executor = CudaExecutor(self.model, self._features, self.bank, faults, engine_cpus)
        else:
            self.executor = InProcessExecutor(self.model, self._features, self.bank, faults, engine_cpus)

    # --- the scheduler's interface ---------------------------------------------------------------

    def submit(self, batch: EngineBatch, preemptible: bool = False) -> Future[EngineResult]:
        """Start a batch (any thread; never waits for it). `preemptible`: batches handed to `preempt`
        meanwhile run between two of its transformer blocks (CPU only; never with a compiled backbone:
        `Settings.effective_preempt`)."""
        return self.executor.submit(batch, preemptible)

    def preempt(self, batch: EngineBatch) -> Future[EngineResult]:
        """Run `batch` at the next block boundary of the preemptible batch computing now (or next,
        when there is none)."""
        return self.executor.preempt(batch)

    def submit_install(self, key: TaskKey, artifact: TaskArtifact) -> Future[int]:
        """Copy a validated task into a bank slot on the engine's own thread, between batches; the
        Future resolves with the slot."""
        return self.executor.call(self.install, key, artifact)

    def stage(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Requests' uint8 image tensors → one batch's images, where this engine wants them
        (`stage_images`)."""
        return stage_images(parts, self.device)

    # --- life cycle ---------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Warmed up, and its executor alive."""
        return self._warm and self.alive

    @property
    def alive(self) -> bool:
        """False once the engine process has died: nothing can compute (liveness fails)."""
        return self.executor.alive

    @property
    def in_child_process(self) -> bool:
        """Batches compute in the engine process (`server/engine/process.py`), not in this one."""
        return isinstance(self.executor, ProcessExecutor)

    def on_death(self, hook: Callable[[], None] | None) -> None:
        """Call `hook` (from a reader thread) if the engine process dies; nothing else can die."""
        if isinstance(self.executor, ProcessExecutor):
            self.executor.process.on_death = hook

    def close(self) -> None:
        """Stop the executor's threads (and the engine process, if any)."""
        self.executor.close()

    @property
    def signature(self) -> BackboneSignature:
        return BackboneSignature(
            embed_dim=self.cfg.embed_dim,
            depth=self.cfg.depth,
            fingerprint=self.backbone.fingerprint,
            backbone_id=self.backbone.backbone_id,
        )

    def install(self, key: TaskKey, artifact: TaskArtifact) -> int:
        """Copy a validated task into a bank slot now, in the calling thread (tests, benchmarks; the
        server uses `submit_install`)."""
        return self.bank.install(key, artifact)

    def run(self, batch: EngineBatch, preemptible: bool = False) -> EngineResult:
        """`submit` and wait (tests, benchmarks; never from the engine's own thread)."""
        return self.submit(batch, preemptible).result()

    def warmup(self, batch_sizes: tuple[int, ...] = (1, 8)) -> None:
        """Run both feature forwards once per batch size where batches compute (kernel selection,
        compile, allocator); on CUDA then capture the CUDA graphs."""
        t0 = time.perf_counter()
        self.executor.warmup(lambda b: warm_features(self.model, self._features, self.bank, b), batch_sizes)
        if isinstance(self.executor, CudaExecutor) and self.cuda_graph_max_batch > 0:
            if self.compiled:
                # Not worth a warning: graphs are on by default, and a compiled backbone runs without them.
                log.info("CUDA graphs are off: the backbone is compiled (torch.compile)")
            else:
                graphs = FeatureGraphs(self.model, self.bank, self.cuda_graph_max_batch, capture=True)
                try:
                    graphs.prepare()
                    self.executor.graphs = graphs
                except RuntimeError as e:  # a failed capture or check: serve eagerly, loudly
                    # A capture that fails on exit leaves its stream current in this thread.
                    torch.cuda.set_stream(torch.cuda.default_stream(self.device))
                    log.error("CUDA graphs are off: %s", e)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        log.info("engine warm-up done in %.2fs", time.perf_counter() - t0)
        self._warm = True

    @property
    def graphs(self) -> FeatureGraphs | None:
        """The captured CUDA graphs, if any."""
        return self.executor.graphs

    @graphs.setter
    def graphs(self, graphs: FeatureGraphs | None) -> None:
        self.executor.graphs = graphs
