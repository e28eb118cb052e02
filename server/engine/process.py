"""The engine's forward passes in a process of their own (CPU): the engine process.

Why: a CPU forward pass is a few hundred torch ops, and between any two of them the engine thread must
take the GIL back. In the server's process the event loop, the HTTP parser and the decoders hold that
GIL most of the time under load, so each re-take waits: a `vit_test_small` forward next to one thread
spinning in Python goes from 2.8 to 13.8 ms, and a tenant's flood of *refused* requests (~0.5 ms of
event-loop CPU each) slowed every other tenant's compute 2x (docs/security.md, "Fair share"). A child
process has its own interpreter and GIL: the front end (HTTP, auth, decoding, scheduling) stays in the
server process, and the forward runs here undisturbed, the split vLLM (API server / engine core) and
TGI (router / shards) make for the same reason.

What crosses, and how (no pickle after start-up):
- At start, once: the model's weights (one buffer) and the prompt bank's tables, in shared memory
  (torch.multiprocessing (no copy per batch; `PromptBank.install` writes the tables in place, so the
  child reads every installed task), plus `lanes`: shared buffers for one batch's images and outputs.
- Per batch: the server copies the images into a free lane and sends a small `struct` message (slots,
  prompt lengths, modes, class counts); the child computes with the same `forward` as the in-process
  engine, writes the outputs into the lane and answers with a `struct` message. A reader thread in
  the server resolves each batch's Future.
- Preemption: between two blocks of a preemptible batch the child runs any batch already waiting in
  its pipe (`Engine.preempt` sends one), as the in-process executor runs its inbox.

Installs stay safe without a lock: a slot is only written while no batch refers to it (refs 0) and
becomes visible to the scheduler only afterwards (`PromptBank`).

If the child dies, every batch in flight fails (503) and `alive` turns False: readiness and liveness
fail (`/readyz`, `/healthz` answer 503), and `on_death` runs: `vpt-serve` then shuts down with exit
status 1, for its supervisor to restart it (as vLLM's API server does when its engine core dies).
"""

from __future__ import annotations

import gc
import logging
import math
import os
import queue
import signal
import struct
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing import util as mp_util
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

import torch
import torch.multiprocessing as tmp

from server.engine.faults import Faults
from server.threads import name_process

if TYPE_CHECKING:
    from server.engine.bank import PromptBank
    from server.engine.batch import EngineBatch
    from vpt.config import ViTConfig
    from vpt.vit import VisionTransformer

log = logging.getLogger(__name__)

# server → child: kind, job, lane, batch size, top-k, output (0 classify, 1 embed), preemptible;
# then int32 slots, int32 prompt lengths, int32 class counts and uint8 deep flags, one per sample.
_REQUEST = struct.Struct("<BiiiiBB")
# child → server: job, status, top-k columns written; then a UTF-8 error message (status != OK).
_REPLY = struct.Struct("<iBi")
_BATCH, _WARMUP, _STOP = 0, 1, 2
_OK, _FAILED, _OOM = 0, 1, 2


def shared_bytes(model: VisionTransformer, bank_bytes: int, max_classes: int, config: ProcessConfig) -> int:
    """Shared memory an engine process needs: the weights, the bank's tables and the lanes."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    cfg = model.cfg
    lanes = _Lanes.nbytes(config.lanes, config.max_batch_size, cfg.img_size, max_classes, cfg.embed_dim)
    return weights + bank_bytes + lanes


def check_shared_memory(need: int, path: str = "/dev/shm") -> None:
    """Refuse to start an engine process, with the fixes, when `path` (where torch puts shared tensors
    on Linux) has less room than the weights, bank and lanes need: a container's default /dev/shm is
    64 MB, and running out later would kill the engine process with SIGBUS mid-batch. (The server
    then computes in its own process and says so.)"""
    if not os.path.isdir(path):
        return  # not Linux: torch shares memory another way
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    if free < need:
        raise EngineStartError(
            f"the engine process needs {need / 2**20:.0f} MiB of shared memory ({path}) for the weights, "
            f"the prompt bank and its buffers, and {free / 2**20:.0f} MiB are free: give the container "
            "more (docker run --shm-size, compose shm_size, a Memory emptyDir on /dev/shm in Kubernetes), "
            "lower VPT_BANK_BYTES / VPT_BANK_SLOTS, or set VPT_ENGINE_PROCESS=false"
        )


class EngineStartError(RuntimeError):
    """The engine process cannot start here (the message says why and what to change)."""


class EngineProcessDied(RuntimeError):
    """The engine process exited: nothing can compute until the server restarts."""


@dataclass(frozen=True)
class ProcessConfig:
    max_batch_size: int  # images per batch (sizes the shared lanes)
    threads: int = 1  # torch intra-op threads in the engine process
    cpus: frozenset[int] = frozenset()  # pin the engine process to these CPUs (empty: no pinning)
    lanes: int = 2  # batches in flight at once (the scheduler's pipeline depth + an overtaker)


@dataclass
class _Lanes:
    """Shared buffers, one row per batch in flight (the sender owns a lane until its reply)."""

    images: torch.Tensor  # (lanes, B, 3, H, W) uint8
    scores: torch.Tensor  # (lanes, B, Cmax) float32
    indices: torch.Tensor  # (lanes, B, Cmax) int64
    features: torch.Tensor  # (lanes, B, D) float32

    @staticmethod
    def nbytes(lanes: int, batch: int, img_size: int, classes: int, dim: int) -> int:
        return lanes * batch * (3 * img_size * img_size + classes * (4 + 8) + dim * 4)

    @classmethod
    def allocate(cls, lanes: int, batch: int, img_size: int, classes: int, dim: int) -> _Lanes:
        return cls(
            torch.zeros(lanes, batch, 3, img_size, img_size, dtype=torch.uint8).share_memory_(),
            torch.zeros(lanes, batch, classes).share_memory_(),
            torch.zeros(lanes, batch, classes, dtype=torch.long).share_memory_(),
            torch.zeros(lanes, batch, dim).share_memory_(),
        )


@dataclass
class _SharedWeights:
    """Every parameter and buffer of the model in one shared-memory buffer.

    One buffer, because each shared storage crosses to the child as a file descriptor of its own, and
    a fork server passes at most ~250 (ViT-L/16 has ~300 tensors)."""

    cfg: ViTConfig
    flat: torch.Tensor  # uint8, shared
    layout: list[tuple[str, torch.dtype, tuple[int, ...], int]]  # name, dtype, shape, byte offset

    @classmethod
    def of(cls, model: VisionTransformer) -> _SharedWeights:
        """Copy the weights into one shared buffer and make `model`'s tensors views of it (so they are
        not held twice)."""
        state = model.state_dict()
        layout, offset = [], 0
        for name, t in state.items():
            layout.append((name, t.dtype, tuple(t.shape), offset))
            offset += -(-t.numel() * t.element_size() // 64) * 64  # 64-byte aligned: any dtype views it
        flat = torch.empty(offset, dtype=torch.uint8).share_memory_()
        weights = cls(model.cfg, flat, layout)
        views = weights.tensors()
        for name, t in state.items():
            views[name].copy_(t)
        model.load_state_dict(views, assign=True)
        return weights

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            name: self.flat[off : off + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
            for name, dtype, shape, off in self.layout
        }

    def model(self) -> VisionTransformer:
        """The model on these weights (no copy): built on the meta device, then given the views."""
        from vpt.vit import VisionTransformer

        with torch.device("meta"):
            model = VisionTransformer(self.cfg)
        model.load_state_dict(self.tensors(), assign=True)
        return model.eval().requires_grad_(False)


@dataclass
class _Job:
    future: Future[tuple[torch.Tensor, ...]]
    lane: int
    embed: bool
    size: int


@dataclass(frozen=True)
class _Tables:
    """The bank's tables as the child sees them (shared memory): a `BankTables`."""

    prompts: torch.Tensor
    prompt_kv: torch.Tensor
    head_weight: torch.Tensor
    head_bias: torch.Tensor


@dataclass(frozen=True)
class _Info:
    """What `forward` reads of a sample's `SlotInfo`."""

    prompt_length: int
    num_classes: int
    deep: bool


class EngineProcess:
    """The server's handle on its engine process: `submit` a batch, get a Future of its outputs."""

    def __init__(
        self,
        model: VisionTransformer,
        bank: PromptBank,
        config: ProcessConfig,
        *,
        compile: bool = False,
        faults: Faults | None = None,
    ) -> None:
        cfg = model.cfg
        self._lanes = _Lanes.allocate(
            config.lanes, config.max_batch_size, cfg.img_size, bank.max_classes, cfg.embed_dim
        )
        weights = _SharedWeights.of(model)
        # allocated shared (`PromptBank`)
        tables = _Tables(bank.prompts, bank.prompt_kv, bank.head_weight, bank.head_bias)
        # Forked from a fork server that has imported torch and this module: a start (or a restart,
        # or another engine in this process, as in tests) takes ~0.2 s instead of spawn's ~2 s, for
        # the same memory (the child shares the server's pages). Plain fork would copy this process's
        # threads' locks in whatever state they are.
        ctx = tmp.get_context("forkserver")
        ctx.set_forkserver_preload(["server.engine.process"])
        self._conn, child_conn = ctx.Pipe()
        self._proc = ctx.Process(
            target=_child_main,
            args=(
                child_conn,
                weights,
                tables,
                self._lanes,
                config.threads,
                config.cpus,
                compile,
                faults or Faults(),
            ),
            name="vpt-engine",
            daemon=True,  # never outlives the server
        )
        self._proc.start()
        child_conn.close()  # the child's end: EOF on ours once the child is gone
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for lane in range(config.lanes):
            self._free.put(lane)
        self._lock = threading.Lock()  # the job table and the pipe's sending side
        self._jobs: dict[int, _Job] = {}
        self._next_job = 0
        self._closing = False
        self.alive = True
        self.on_death: Callable[[], None] | None = None  # called (reader thread) if the child dies
        self._reader = threading.Thread(target=self._read, name="vpt-engine-reader", daemon=True)
        self._reader.start()
        # At interpreter exit, before multiprocessing joins its daemon children (without a timeout):
        # the child ignores SIGTERM and leaves only when told or when its pipe closes.
        self._finalizer = mp_util.Finalize(self, self.close, exitpriority=10)

    @property
    def in_flight(self) -> int:
        """Batches sent and not answered yet."""
        return len(self._jobs)

    def submit(self, batch: EngineBatch, preemptible: bool = False) -> Future[tuple[torch.Tensor, ...]]:
        """Send one batch; the Future resolves with (scores, indices) or (features,) host tensors."""
        n = len(batch.slots)
        lane = self._take_lane()
        try:
            self._lanes.images[lane, :n].copy_(batch.images)
            columns = (
                torch.tensor(batch.slots, dtype=torch.int32),
                torch.tensor([i.prompt_length for i in batch.infos], dtype=torch.int32),
                torch.tensor([i.num_classes for i in batch.infos], dtype=torch.int32),
                torch.tensor([i.deep for i in batch.infos], dtype=torch.uint8),
            )
            body = b"".join(c.numpy().tobytes() for c in columns)
        except BaseException:
            self._free.put(lane)
            raise
        embed = batch.output == "embed"
        return self._send(_BATCH, _Job(Future(), lane, embed, n), batch.top_k, preemptible, body)

    def warmup(self, batch_sizes: tuple[int, ...]) -> None:
        """Run the plain backbone once per batch size in the child; also waits for it to be up."""
        for b in batch_sizes:
            lane = self._take_lane()
            self._send(_WARMUP, _Job(Future(), lane, True, b)).result()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self.alive:
            try:
                with self._lock:
                    self._conn.send_bytes(_REQUEST.pack(_STOP, 0, 0, 0, 0, 0, 0))
            except OSError:
                pass
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._reader.join(timeout=10)  # it ends on the child's EOF
        self._conn.close()

    def _take_lane(self) -> int:
        # The scheduler never has more than `lanes` batches in flight, so this does not wait; the
        # timeout turns a bug into one failed batch instead of a hung engine thread or event loop.
        try:
            return self._free.get(timeout=30)
        except queue.Empty:
            raise RuntimeError(
                "no free engine lane: more batches in flight than ProcessConfig.lanes"
            ) from None

    def _send(
        self, kind: int, job: _Job, top_k: int = 0, preemptible: bool = False, body: bytes = b""
    ) -> Future[tuple[torch.Tensor, ...]]:
        with self._lock:
            if not self.alive:
                self._free.put(job.lane)
                raise EngineProcessDied("the engine process has exited")
            job_id = self._next_job = (self._next_job + 1) & 0x7FFFFFFF  # the header's int32
            header = _REQUEST.pack(kind, job_id, job.lane, job.size, top_k, job.embed, preemptible)
            try:
                self._conn.send_bytes(header + body)
            except OSError:  # the child is gone: the reader thread fails what is in flight
                self._free.put(job.lane)
                raise EngineProcessDied("the engine process has exited") from None
            self._jobs[job_id] = job
        return job.future

    def _read(self) -> None:
        """Reader thread: resolve each reply's Future; fail everything once the child is gone."""
        while True:
            try:
                msg = self._conn.recv_bytes()
            except (EOFError, OSError):
                break
            try:
                self._reply(msg)
            except Exception:  # a bug here would leave every later batch waiting: stop serving loudly
                log.exception("unreadable reply from the engine process; stopping it")
                self._proc.kill()
                break
        with self._lock:
            self.alive = False
            jobs, self._jobs = self._jobs, {}
        for job in jobs.values():
            self._free.put(job.lane)
            job.future.set_exception(EngineProcessDied("the engine process has exited"))
        if not self._closing:
            self._proc.join(timeout=5)
            log.critical(
                "the engine process exited (code %s): nothing can compute; liveness now fails",
                self._proc.exitcode,
            )
            if self.on_death is not None:
                self.on_death()

    def _reply(self, msg: bytes) -> None:
        job_id, status, k = _REPLY.unpack_from(msg)
        with self._lock:
            job = self._jobs.pop(job_id)
        if status != _OK:
            self._free.put(job.lane)
            text = msg[_REPLY.size :].decode()
            job.future.set_exception(torch.OutOfMemoryError(text) if status == _OOM else RuntimeError(text))
            return
        lanes, n = self._lanes, job.size
        out = (
            (lanes.features[job.lane, :n].clone(),)
            if job.embed
            else (lanes.scores[job.lane, :n, :k].clone(), lanes.indices[job.lane, :n, :k].clone())
        )
        self._free.put(job.lane)  # after the copy: the next batch may overwrite the lane
        job.future.set_result(out)


def _child_main(
    conn: Connection,
    weights: _SharedWeights,
    tables: _Tables,
    lanes: _Lanes,
    threads: int,
    cpus: frozenset[int],
    compile: bool,
    faults: Faults,
) -> None:
    """The engine process: compute batches from `conn` until told to stop or the server is gone."""
    from server.engine.batch import EngineBatch, feature_forward, forward, warm_features  # the child imports

    # Ctrl-C in a terminal and a SIGTERM to the process group reach this process too: the server
    # drains its requests first and then stops it (`close`), or it exits when the server's end closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the server's tenants-file reload signal
    name_process("vpt-engine")
    torch.set_num_threads(threads)
    model = weights.model()
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)
    features = feature_forward(model, compile)
    gc.collect()
    gc.freeze()  # long-lived objects: keep full collections from scanning them mid-batch
    stop = False

    def handle(msg: bytes, preemptible_ok: bool) -> None:
        nonlocal stop
        kind, job, lane, n, top_k, embed, preemptible = _REQUEST.unpack_from(msg)
        if kind == _STOP:
            stop = True
            return
        k, status, error = 0, _OK, b""
        try:
            with torch.inference_mode():
                if kind == _WARMUP:
                    warm_features(model, features, tables, n)
                else:
                    if faults:
                        faults.check(n)
                    cols = torch.frombuffer(
                        bytearray(msg[_REQUEST.size : _REQUEST.size + 12 * n]), dtype=torch.int32
                    )
                    slots, lengths, classes = cols.view(3, n).tolist()
                    deep = list(msg[_REQUEST.size + 12 * n : _REQUEST.size + 13 * n])
                    infos = [_Info(p, c, bool(d)) for p, c, d in zip(lengths, classes, deep, strict=True)]
                    batch = EngineBatch(
                        lanes.images[lane, :n], slots, infos, "embed" if embed else "classify", top_k
                    )  # type: ignore[arg-type]
                    out = forward(
                        model,
                        features,
                        tables,
                        batch.images,
                        batch,
                        between_blocks=serve_waiting if preemptible and preemptible_ok else None,
                    )
                    if embed:
                        lanes.features[lane, :n].copy_(out[0])
                    else:
                        k = out[0].shape[1]
                        lanes.scores[lane, :n, :k].copy_(out[0])
                        lanes.indices[lane, :n, :k].copy_(out[1])
        except torch.OutOfMemoryError as e:
            status, error = _OOM, str(e).encode()
        except Exception as e:  # this batch fails (503 for its requests); the next one runs
            status, error = _FAILED, f"{type(e).__name__}: {e}".encode()
        conn.send_bytes(_REPLY.pack(job, status, k) + error)

    def serve_waiting() -> None:
        # Between two blocks of a preemptible batch: batches already sent run now (not preempted).
        while conn.poll():
            handle(conn.recv_bytes(), preemptible_ok=False)

    while not stop:
        try:
            msg = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the server is gone
        handle(msg, preemptible_ok=True)
