"""The running server's parts, built once at start-up from `Settings` and torn down at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import ipaddress
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prompt_store.artifact import ArtifactLimits, read_metadata, validate_for_backbone
from prompt_store.base import PromptStore
from prompt_store.errors import ArtifactError
from prompt_store.url import open_store
from server.engine.bank import TaskTooLarge
from server.engine.engine import Engine, pick_device, pick_dtype
from server.engine.process import EngineStartError, ProcessConfig
from server.metrics import Metrics, TaskStats
from server.preprocess import Preprocessor
from server.ratelimit import RateLimiter
from server.scheduler.scheduler import Scheduler, SchedulerConfig
from server.settings import Settings
from server.tenants import (
    TenantRegistry,
    TenantsFileError,
    admin_key_path,
    keygen_line,
    write_atomic,
)
from server.threads import available_cpus, engine_cpu_set, pin_process
from server.uploads import TaskUploads
from vpt.hub import Backbone, load_backbone
from vpt.transforms import ImageLimits

log = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    engine: Engine
    store: PromptStore
    scheduler: Scheduler
    preprocess: Preprocessor
    metrics: Metrics
    task_stats: TaskStats  # usage per task, for the tasks the residency knows to exist
    tenants: TenantRegistry | None = None  # None = open mode
    rate_limiter: RateLimiter = field(default_factory=RateLimiter)
    draining: bool = False
    switch_interval_before: float | None = None  # restored by stop (setswitchinterval is process-wide)
    affinity_before: frozenset[int] | None = None  # this process's CPUs before it left the engine's
    uploads: TaskUploads = field(init=False)  # stores uploads; creates queue per tenant, not in threads

    def __post_init__(self) -> None:
        self.uploads = TaskUploads(self.store, self.validate_upload)

    @classmethod
    async def start(
        cls, settings: Settings, *, store: PromptStore | None = None, metrics: Metrics | None = None
    ) -> Services:
        """Load the backbone (in a thread: downloads and weight conversion are slow), open the store,
        warm up, start the scheduler."""
        tenants = open_tenants(settings)  # first: a misconfiguration fails before any slow work
        device = pick_device(settings.device)
        dtype = pick_dtype(settings.dtype, device)
        cpus = available_cpus()
        threads = settings.torch_threads or (max(1, cpus - 1) if device.type == "cpu" else 0)
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
            if store is None:
                s3 = {"endpoint_url": settings.s3_endpoint_url, "region": settings.s3_region}
                store = open_store(
                    settings.store,
                    keep_versions=settings.keep_versions,
                    limits=artifact_limits(settings),
                    **(s3 if settings.store.startswith("s3://") else {}),
                )
            metrics = metrics or Metrics()
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
            metrics.bind(engine.bank.stats, lambda: scheduler.queued_images, lambda: scheduler.in_flight)
            await asyncio.to_thread(engine.warmup, tuple(sorted({1, min(8, settings.max_batch_size)})))
            await scheduler.start()
            preprocess = Preprocessor(
                backbone.cfg,
                ImageLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels),
                # As many as the CPUs, counted before this process left the engine's: a request's
                # decode must not queue behind another's in a pool of one thread.
                settings.decode_threads or cpus,
                device=device,
                gpu_decode=settings.gpu_decode,
            )
            # Everything alive now (torch, FastAPI, the backbone's Python objects: ~250k tracked objects)
            # lives as long as the server. A full collection scans them all and holds the GIL for ~150 ms,
            # every thread stalled: those were the rare 100-200 ms latency spikes under load. Frozen, they
            # are left out of every collection (CPython's gc.freeze, meant for exactly this).
            gc.collect()
            gc.freeze()
            undo.pop_all()  # started: `stop` undoes it from now on
            return cls(
                settings,
                engine,
                store,
                scheduler,
                preprocess,
                metrics,
                TaskStats(scheduler.residency.knows),
                tenants=tenants,
                switch_interval_before=switch_interval_before,
                affinity_before=affinity_before,
            )

    @property
    def ready(self) -> bool:
        return self.engine.ready and not self.draining

    @property
    def not_ready_reason(self) -> str:
        return "draining" if self.draining else "starting"

    def validate_upload(self, data: bytes) -> None:
        """Store-side validator: the artifact must fit this backbone and this bank."""
        meta = read_metadata(data, artifact_limits(self.settings))
        validate_for_backbone(meta, self.engine.signature)
        _, P, _ = meta.prompt_shape
        try:
            self.engine.bank.check_fits_shape(P, meta.num_classes)
        except TaskTooLarge as e:
            raise ArtifactError(e.field, str(e)) from None

    async def stop(self) -> None:
        self.draining = True
        try:
            await self.scheduler.drain(timeout_s=self.settings.request_timeout_s)
            await self.scheduler.close()
        finally:  # whatever happened, the engine process is stopped (it waits up to ~10 s: a thread)
            await asyncio.to_thread(self.engine.close)
            self.preprocess.close()
            self.store.close()
        # start's process-wide settings, undone: an in-process app (tests, embedding) leaves the
        # interpreter as it found it, and its engine can be collected.
        gc.unfreeze()
        if self.switch_interval_before is not None:
            sys.setswitchinterval(self.switch_interval_before)
        if self.affinity_before is not None:
            pin_process(self.affinity_before)


def open_tenants(settings: Settings) -> TenantRegistry | None:
    """The tenant registry, or None in open mode (refused on a non-loopback bind unless forced).

    With neither a tenants file nor open mode, a tenants file with one admin tenant is created, so the
    embedded defaults are secure and still usable out of the box. Its key goes to `admin-key` beside
    the file (0600) and is printed at every start while that file exists: a key printed once scrolls
    away with the log of a start that then fails. The operator ends it by deleting the file, which
    needs no state on the request path and is the same on every replica.
    """
    if settings.open_mode:
        if not _is_loopback(settings.host) and not settings.open_mode_force:
            raise SystemExit(
                f"refusing open mode (no API keys) on non-loopback host {settings.host!r}: "
                "use a tenants file, or set VPT_OPEN_MODE_FORCE=true if you really mean it"
            )
        log.warning(
            "\n%s\nOPEN MODE: no API keys are checked; every caller is the admin of tenant %r. "
            "For local development only.\n%s",
            "!" * 78,
            settings.default_tenant,
            "!" * 78,
        )
        return None
    path = Path(settings.tenants_file)
    created = not path.exists()
    if created:
        key, toml = keygen_line("admin", "admin")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("# Created by vpt-serve on first start. Add tenants with `vpt keygen --tenant NAME`.\n")
            f.write(toml)
        write_atomic(admin_key_path(path), key + "\n")
    try:
        registry = TenantRegistry.from_file(path)
    except TenantsFileError as e:
        raise SystemExit(str(e)) from None
    _show_admin_key(registry, created)
    return registry


def _show_admin_key(registry: TenantRegistry, created: bool) -> None:
    """Print the admin key kept beside the tenants file, if that file exists and the key still works."""
    assert registry.path is not None
    key_path = admin_key_path(registry.path)
    try:
        key = key_path.read_text().strip()
        mode = key_path.stat().st_mode & 0o777
    except FileNotFoundError:
        return
    rotate = f"vpt keygen --rotate --tenant admin --tenants-file {registry.path}"
    tenant = registry.authenticate(key)
    if tenant is None or tenant.role != "admin":
        log.warning(
            "%s holds a key %s does not accept as an admin's (rotated?): delete it. A new admin key: `%s`",
            key_path,
            registry.path,
            rotate,
        )
        return
    what = (
        f"Created {registry.path} with an admin tenant {tenant.name!r}. Its API key"
        if created
        else f"The API key of admin tenant {tenant.name!r}"
    )
    log.warning(
        "\n%s\n%s (also in %s):\n\n    %s\n\nShown at every start while %s exists: store the key "
        "elsewhere, then delete that file.\nLost it? `%s` makes a new one.\n%s",
        "=" * 78,
        what,
        key_path,
        key,
        key_path.name,
        rotate,
        "=" * 78,
    )
    if mode & 0o077:
        log.warning("%s is readable by other users (mode %o): chmod 600 it, or delete it", key_path, mode)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def artifact_limits(settings: Settings) -> ArtifactLimits:
    return ArtifactLimits(
        max_bytes=settings.max_artifact_bytes,
        max_prompt_length=settings.max_prompt_length,
        max_classes=settings.max_classes,
    )
