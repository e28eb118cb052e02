"""Executors: what runs the engine's batches. One is chosen when the engine starts (`Engine`).

Every executor has the same contract, the only one the scheduler uses:
- `submit(batch, preemptible=False) -> Future[EngineResult]` from any thread, the event loop too (it
  never waits for a batch);
- `preempt(batch) -> Future[EngineResult]`: run `batch` between two transformer blocks of the
  preemptible batch computing now (one that was submitted with `preemptible=True`), or as soon as
  possible when there is none — a light tenant's request then waits for one block, not one batch
  (CPU; `server/scheduler/scheduler.py`);
- `call(fn, *args) -> Future`: run `fn` on the executor's own thread, between batches (a task's
  install into the bank).

The three executors:
- `InProcessExecutor` (CPU): forwards on one engine thread of this process.
- `CudaExecutor`: one thread launches batches (nothing in a launch waits for the device, so batch k+1
  is launched while batch k computes), another collects them; small batches replay CUDA graphs.
- `ProcessExecutor` (CPU, the default): forwards in an engine process of its own
  (`server/engine/process.py`), which runs batches waiting in its pipe between two blocks of a
  preemptible one.
They share `server/engine/batch.py` (the batch types and `forward`) and import nothing of each other.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from server.engine.batch import BankTables, EngineBatch, EngineResult, forward, result
from server.engine.faults import Faults
from server.threads import pin_thread

if TYPE_CHECKING:
    from server.engine.graphs import FeatureGraphs
    from server.engine.process import EngineProcess
    from vpt.vit import VisionTransformer

T = TypeVar("T")


class Executor(ABC):
    """Runs batches (see the module docstring for the contract)."""

    def __init__(self, name: str, cpus: frozenset[int] = frozenset()) -> None:
        # The executor's own thread: `call`s, and for the in-process executors the forwards too.
        self._thread = ThreadPoolExecutor(
            1, thread_name_prefix=name, initializer=pin_thread, initargs=(cpus,)
        )
        # Padded static forwards for small batches, replayed as CUDA graphs (captured by
        # `Engine.warmup`; on CPU only tests set them, to check the padding). In-process executors.
        self.graphs: FeatureGraphs | None = None

    @abstractmethod
    def submit(self, batch: EngineBatch, preemptible: bool = False) -> Future[EngineResult]: ...

    def preempt(self, batch: EngineBatch) -> Future[EngineResult]:
        """Run between two blocks of the preemptible batch computing now, or next."""
        return self.submit(batch)

    def call(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        return self._thread.submit(fn, *args)

    @property
    def alive(self) -> bool:
        """False once nothing can compute any more (the engine process died)."""
        return True

    def warmup(self, warm: Callable[[int], None], batch_sizes: tuple[int, ...]) -> None:
        """Run `warm(batch size)` for each size where the forwards run (this process's engine thread)."""
        self.call(lambda: [warm(b) for b in batch_sizes]).result()

    def close(self) -> None:
        self._thread.shutdown(wait=True)


def _settle(fut: Future[T], compute: Callable[[], T]) -> None:
    try:
        fut.set_result(compute())
    except BaseException as e:  # the batch fails; its Future carries why
        fut.set_exception(e)


class _Local(Executor):
    """An executor whose forwards run in this process, from its engine thread."""

    def __init__(
        self,
        model: VisionTransformer,
        features: Callable[..., torch.Tensor],
        bank: BankTables,
        faults: Faults,
        cpus: frozenset[int] = frozenset(),
    ) -> None:
        super().__init__("vpt-engine", cpus)
        self._model, self._features, self._bank, self._faults = model, features, bank, faults


class InProcessExecutor(_Local):
    """CPU: every forward on one engine thread of this process."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Batches handed to `preempt` while a preemptible batch is submitted and not finished: served
        # between its blocks. Counted from `submit`, not from when the engine thread starts it, so a
        # request the scheduler hands over at once is not queued behind the whole batch.
        self._lock = threading.Lock()
        self._inbox: list[tuple[EngineBatch, Future[EngineResult]]] = []
        self._preemptible = 0

    def submit(self, batch: EngineBatch, preemptible: bool = False) -> Future[EngineResult]:
        if preemptible:
            with self._lock:
                self._preemptible += 1
        return self._thread.submit(self._run, batch, preemptible)

    def preempt(self, batch: EngineBatch) -> Future[EngineResult]:
        with self._lock:
            if self._preemptible:
                fut: Future[EngineResult] = Future()
                self._inbox.append((batch, fut))
                return fut
        return self.submit(batch)  # nothing to preempt (any more): next on the engine thread

    def _run(self, batch: EngineBatch, preemptible: bool) -> EngineResult:
        try:
            return self._forward(batch, self._serve_inbox if preemptible else None)
        finally:
            if preemptible:
                with self._lock:
                    self._preemptible -= 1
                    leftover = bool(self._inbox) and not self._preemptible
                if leftover:  # handed over after its last block boundary: next, after this result
                    self._thread.submit(self._serve_inbox)

    @torch.inference_mode()
    def _forward(self, batch: EngineBatch, between_blocks: Callable[[], None] | None) -> EngineResult:
        started = time.perf_counter()
        if self._faults:
            self._faults.check(len(batch.slots))
        out = forward(
            self._model, self._features, self._bank, batch.images, batch, between_blocks, self.graphs
        )
        return result(out, batch.output, started)

    def _serve_inbox(self) -> None:
        """Engine thread: run the batches handed over and not run yet (an overtaker is not itself
        preempted). Between two blocks of a preemptible batch, and after it."""
        while True:
            with self._lock:
                if not self._inbox:
                    return
                batch, fut = self._inbox.pop(0)
            _settle(fut, lambda b=batch: self._forward(b, None))  # type: ignore[misc]


class CudaExecutor(_Local):
    """CUDA: a launch thread enqueues each batch's kernels (and the copy of its outputs to pinned host
    memory) without waiting for the device; a collect thread waits for each batch in turn. So with
    two batches in flight the host prepares and launches batch k+1 while the device computes batch k."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._device = self._model.pos_embed.device
        self._collect = ThreadPoolExecutor(1, thread_name_prefix="vpt-collect")

    def submit(self, batch: EngineBatch, preemptible: bool = False) -> Future[EngineResult]:
        fut: Future[EngineResult] = Future()
        self._thread.submit(self._launch, batch, fut)
        return fut

    @torch.inference_mode()
    def _launch(self, batch: EngineBatch, fut: Future[EngineResult]) -> None:
        started = time.perf_counter()
        try:
            if self._faults:
                self._faults.check(len(batch.slots))
            images = batch.images.to(self._device, non_blocking=True)
            out = forward(self._model, self._features, self._bank, images, batch, graphs=self.graphs)
            out = tuple(t.to("cpu", non_blocking=True) for t in out)
            event = torch.cuda.Event()
            event.record()
        except torch.OutOfMemoryError as e:
            # Give cached blocks back before the scheduler retries smaller batches.
            torch.cuda.empty_cache()
            fut.set_exception(e)
            return
        except BaseException as e:
            fut.set_exception(e)
            return

        def collect() -> EngineResult:
            event.synchronize()
            return result(out, batch.output, started)

        self._collect.submit(_settle, fut, collect)

    def close(self) -> None:
        super().close()
        self._collect.shutdown(wait=True)


class ProcessExecutor(Executor):
    """CPU: forwards in the engine process (`EngineProcess`); a batch is sent from the calling thread
    (the event loop: it copies the images into a shared lane and writes one message), its Future
    resolves from the process's reader thread. `call`s run on a thread of their own."""

    def __init__(self, process: EngineProcess) -> None:
        super().__init__("vpt-install")
        self.process = process

    def submit(self, batch: EngineBatch, preemptible: bool = False) -> Future[EngineResult]:
        started = time.perf_counter()
        fut: Future[EngineResult] = Future()
        sent = self.process.submit(batch, preemptible)
        sent.add_done_callback(lambda f: _settle(fut, lambda: result(f.result(), batch.output, started)))
        return fut

    # `preempt` = `submit`: the pipe is FIFO, and the process runs what waits in it between two blocks
    # of a preemptible batch, else next.

    @property
    def alive(self) -> bool:
        return self.process.alive

    def warmup(self, warm: Callable[[int], None], batch_sizes: tuple[int, ...]) -> None:
        self.process.warmup(batch_sizes)  # the process warms its own forwards

    def close(self) -> None:
        self.process.close()
        super().close()
