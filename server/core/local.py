"""The engine core in this process: device, backbone, prompt bank, residency, fair scheduler, executor.

`LocalCore.start` builds it from `Settings`. The HTTP app uses it directly when it runs in one process
(`VPT_API_SERVERS=0`, embedded apps, tests); the engine-core process (`server.core.process`) serves the
same object to its API servers over a socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import logging
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from prompt_store.artifact import ArtifactLimits
from prompt_store.base import PromptStore
from prompt_store.url import open_store
from server.core.handle import Admission, Core, EngineInfo, TaskState
from server.engine.batch import Output
from server.engine.engine import Engine, pick_device, pick_dtype
from server.engine.process import EngineStartError, ProcessConfig
from server.errors import InternalError
from server.gpu_decode import GpuDecoder
from server.metrics import LiveStats, Metrics, TaskStats
from server.preprocess import Pixels
from server.scheduler.scheduler import Scheduler, SchedulerConfig
from server.scheduler.types import Result
from server.settings import Settings
from server.threads import available_cpus, engine_cpu_set, pin_process
from vpt.hub import Backbone, load_backbone
from vpt.transforms import ImageLimits

log = logging.getLogger(__name__)


def artifact_limits(settings: Settings) -> ArtifactLimits:
    return ArtifactLimits(
        max_bytes=settings.max_artifact_bytes,
        max_prompt_length=settings.max_prompt_length,
        max_classes=settings.max_classes,
    )


def open_settings_store(settings: Settings) -> PromptStore:
    s3 = {"endpoint_url": settings.s3_endpoint_url, "region": settings.s3_region}
    return open_store(
        settings.store,
        keep_versions=settings.keep_versions,
        limits=artifact_limits(settings),
        **(s3 if settings.store.startswith("s3://") else {}),
    )


class LocalCore(Core):
    def __init__(
        self,
        engine: Engine,
        scheduler: Scheduler,
        *,
        settings: Settings | None = None,
        switch_interval_before: float | None = None,
        affinity_before: frozenset[int] | None = None,
    ) -> None:
        self.engine, self.scheduler, self.settings = engine, scheduler, settings
        self.info = EngineInfo.of(engine)
        self.task_stats = TaskStats(scheduler.residency.knows)  # usage per task the residency knows
        self.gpu_decoder: GpuDecoder | None = None
        self._decode_pool: ThreadPoolExecutor | None = None
        self._switch_interval_before = switch_interval_before  # restored by stop (process-wide)
        self._affinity_before = affinity_before  # this process's CPUs before it left the engine's

    @classmethod
    async def start(cls, settings: Settings, store: PromptStore, metrics: Metrics) -> LocalCore:
        """Load the backbone (in a thread: downloads and weight conversion are slow), start the engine,
        warm up, start the scheduler. `store` is the core's: residency reads task versions from it."""
        device = pick_device(settings.device)
        dtype = pick_dtype(settings.dtype, device)
        threads = settings.torch_threads or (max(1, available_cpus() - 1) if device.type == "cpu" else 0)
        in_process = not settings.effective_engine_process(device.type)
        if threads:
            # On CPU the engine shares cores with HTTP and decoding; one core left for them keeps
            # torch's threads from spinning against the event loop (measured 8x on 2 cores). With an
            # engine process, this one's torch only transforms images: one thread.
            torch.set_num_threads(threads if in_process else 1)
        # On CPU the engine thread keeps to its own cores: moved around and sharing cores with the
        # event loop and the decoders, it used ~1.6x the CPU per image it uses alone (load benchmark,
        # 2 cores: +25-40% img/s at saturation pinned). The other threads may use every core.
        pin = settings.pin_threads and device.type == "cpu"
        engine_cpus = engine_cpu_set(threads) if pin else frozenset()
        # The engine thread needs the GIL back between torch ops; while the event loop holds it, each
        # re-take waits up to the switch interval (5 ms by default), which made a 1-image forward ~4x
        # slower under HTTP load. A shorter interval bounds that wait (fair-share test, B's p50 under
        # a flood: 56 ms at 5 ms, ~25 ms at 0.5 ms, ~17 ms at 0.1 ms; solo ~10 ms).
        switch_interval_before = sys.getswitchinterval()
        sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)
        backbone: Backbone = await asyncio.to_thread(
            load_backbone,
            settings.backbone,
            device=device,
            dtype=dtype,
            img_size=settings.img_size,
            cache_dir=settings.hf_cache_dir,
        )
        log.info(
            "backbone %s (fingerprint %s) on %s/%s", backbone.backbone_id, backbone.fingerprint, device, dtype
        )
        make_engine = functools.partial(
            Engine,
            backbone,
            bank_slots=settings.bank_slots,
            max_prompt_length=settings.max_prompt_length,
            max_classes=settings.max_classes,
            bank_bytes=settings.bank_bytes,
            compile=settings.compile,
            cuda_graph_max_batch=min(settings.cuda_graph_max_batch, settings.max_batch_size),
            fault_oom_over=settings.fault_oom_over,
            fault_fail_every=settings.fault_fail_every,
        )
        try:
            process = ProcessConfig(
                settings.max_batch_size,
                threads=threads,
                cpus=engine_cpus,
                lanes=settings.effective_pipeline_depth(device.type) + 1,  # + an overtaker
            )
            # In this process, the engine thread keeps to `engine_cpus`; an engine process pins itself.
            engine = make_engine(engine_cpus=engine_cpus) if in_process else make_engine(process=process)
        except EngineStartError as e:  # too little shared memory: serve anyway, slower under load
            log.warning("%s. Computing in the server process instead.", e)
            torch.set_num_threads(threads)
            engine = make_engine(engine_cpus=engine_cpus)
        with contextlib.ExitStack() as undo:  # undone if start-up fails from here on
            undo.callback(engine.close)
            affinity_before = None
            if engine.in_child_process and engine_cpus:
                # The engine process has its cores; this one (HTTP, decoding) keeps off them.
                affinity_before = frozenset(os.sched_getaffinity(0))
                pin_process(affinity_before - engine_cpus)
                undo.callback(pin_process, affinity_before)
            for item in settings.pinned_tasks:
                engine.bank.pin(*item.split("/", 1))
            scheduler = Scheduler(
                engine,
                store,
                SchedulerConfig(
                    max_batch_size=settings.max_batch_size,
                    max_batch_delay_s=settings.max_batch_delay_ms / 1000,
                    max_queue_images=settings.max_queue_images,
                    batching=settings.batching,
                    pipeline_depth=settings.effective_pipeline_depth(device.type),
                    version_ttl_s=settings.version_ttl_s,
                    preempt=settings.effective_preempt(device.type),
                ),
                hooks=metrics,
            )
            await asyncio.to_thread(engine.warmup, tuple(sorted({1, min(8, settings.max_batch_size)})))
            await scheduler.start()
            undo.pop_all()  # started: `stop` undoes it from now on
        core = cls(
            engine,
            scheduler,
            settings=settings,
            switch_interval_before=switch_interval_before,
            affinity_before=affinity_before,
        )
        if settings.gpu_decode:
            limits = ImageLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)
            core.use_gpu_decoder(GpuDecoder(device, backbone.cfg, limits))
        metrics.bind(core.live_now)
        return core

    def use_gpu_decoder(self, decoder: GpuDecoder) -> None:
        """Decode the JPEGs requests leave encoded with `decoder` (`VPT_GPU_DECODE`), if it is available;
        API servers learn it from `info` when they connect."""
        if not decoder.available:
            log.warning("GPU JPEG decoding is off, Pillow decodes every image: %s", decoder.reason)
            return
        log.info("GPU JPEG decoding on %s (nvJPEG via torchvision)", decoder.device)
        self.gpu_decoder = decoder
        # One request's JPEGs at a time (the decoder's lock): on a thread of their own, they wait there
        # and not in the event loop.
        self._decode_pool = ThreadPoolExecutor(1, thread_name_prefix="vpt-gpu-decode")
        self.info = dataclasses.replace(self.info, gpu_decode=True)

    def on_death(self, hook: Callable[[], None] | None) -> None:
        self.engine.on_death(hook)

    async def stop(self, timeout_s: float) -> None:
        """Drain (queued and in-flight work finishes, up to `timeout_s`), then stop the engine."""
        try:
            await self.scheduler.drain(timeout_s=timeout_s)
            await self.scheduler.close()
        finally:  # whatever happened, the engine process is stopped (it waits up to ~10 s: a thread)
            await asyncio.to_thread(self.engine.close)
        # start's process-wide settings, undone: an in-process app (tests, embedding) leaves the
        # interpreter as it found it, and its engine can be collected.
        gc.unfreeze()
        if self._decode_pool is not None:
            self._decode_pool.shutdown(wait=False, cancel_futures=True)
        if self._switch_interval_before is not None:
            sys.setswitchinterval(self._switch_interval_before)
        if self._affinity_before is not None:
            pin_process(self._affinity_before)

    # --- Core ------------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self.engine.alive

    @property
    def ready(self) -> bool:
        return self.engine.ready

    async def admit(self, tenant: str, n: int, tenant_max_queued: int | None) -> Admission:
        return self.hold(tenant, n, tenant_max_queued)

    def queue_state(self, tenant: str) -> tuple[int, int]:
        """(the tenant's queued images, every tenant's): what the API servers' admission goes by."""
        return self.scheduler.queued_images_of(tenant), self.scheduler.queued_images

    def hold(self, tenant: str, n: int, tenant_max_queued: int | None) -> Admission:
        """`admit`, which never waits here: the room held now, or Overloaded."""
        return _HeldRoom(self.scheduler, tenant, n, tenant_max_queued)

    async def run(
        self,
        admission: Admission,
        task_id: str,
        images: Pixels,
        outputs: tuple[Output, ...],
        *,
        top_k: int,
        timeout_s: float,
        weight: float,
    ) -> list[Result]:
        pixels = await self._on_device(images) if images.jpegs else images.images
        admission.release()  # no await between this and the submissions' queueing: no one slips in
        tenant = admission.tenant
        jobs = [
            self.scheduler.submit(
                tenant,
                task_id,
                pixels,
                output=output,
                top_k=top_k,
                timeout_s=timeout_s,
                weight=weight,
                tenant_max_queued=admission.tenant_max_queued,
            )
            for output in outputs
        ]
        ok = False
        try:
            # One output (every /v1 request) awaits its submission alone: no task per request.
            results = await _all(jobs) if len(jobs) > 1 else [await jobs[0]]
            ok = True
            return results
        finally:  # cancelled (client gone) counts as failed, as any error does
            self.task_stats.record(tenant, task_id, images.n, ok=ok)

    async def _on_device(self, images: Pixels) -> torch.Tensor:
        """The request's JPEGs decoded on the device, its other rows copied there (`GpuDecoder`)."""
        if self.gpu_decoder is None or self._decode_pool is None:
            raise InternalError("JPEGs for the engine core to decode, but it has no GPU decoder")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._decode_pool, self.gpu_decoder.complete, images.images, images.jpegs
        )

    async def task_changed(self, tenant: str, task_id: str, version: int) -> None:
        self.scheduler.task_changed(tenant, task_id, version)

    async def task_deleted(self, tenant: str, task_id: str) -> None:
        self.scheduler.task_deleted(tenant, task_id)
        self.task_stats.forget(tenant, task_id)

    async def task_state(self, tenant: str, task_ids: list[str]) -> list[TaskState]:
        return [
            TaskState(self.scheduler.resident_versions(tenant, t), self.task_stats.get(tenant, t))
            for t in task_ids
        ]

    async def live(self) -> LiveStats:
        return self.live_now()

    def live_now(self) -> LiveStats:
        return LiveStats(self.engine.bank.stats(), self.scheduler.queued_images, self.scheduler.in_flight)


class _HeldRoom(Admission):
    def __init__(self, scheduler: Scheduler, tenant: str, n: int, tenant_max_queued: int | None) -> None:
        super().__init__(tenant, n, tenant_max_queued)
        self._held = scheduler.admit(tenant, n, tenant_max_queued)
        self._held.__enter__()  # Overloaded when the bounds refuse it

    def _release(self) -> None:
        self._held.__exit__(None, None, None)


async def _all(jobs: list[Any]) -> list[Result]:
    """Every job's result, in order; the first to fail cancels the others, which are awaited before
    its error goes on (so their queued images are gone by then). Python 3.10 has no TaskGroup."""
    tasks = [asyncio.ensure_future(job) for job in jobs]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
