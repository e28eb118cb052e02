"""The running server's parts, built once at start-up from `Settings` and torn down at shutdown."""

from __future__ import annotations

import contextlib
import gc
import ipaddress
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prompt_store.artifact import read_metadata, validate_for_backbone
from prompt_store.base import PromptStore
from prompt_store.errors import ArtifactError
from server.core.client import CoreAddress, CoreClient
from server.core.handle import Core
from server.core.local import LocalCore, artifact_limits, open_settings_store
from server.core.process import jpeg_budget
from server.engine.bank import TaskTooLarge, check_fits_shape
from server.metrics import Metrics
from server.preprocess import Preprocessor
from server.ratelimit import RateLimiter, SharedRateLimiter
from server.settings import Settings
from server.tenants import (
    TenantRegistry,
    TenantsFileError,
    admin_key_path,
    keygen_line,
    write_atomic,
)
from server.threads import available_cpus
from server.uploads import TaskUploads
from vpt.transforms import ImageLimits

log = logging.getLogger(__name__)


@dataclass
class Services:
    """What the routes use. `core` is the engine core: in this process (`LocalCore`), or the engine-core
    process reached over its socket (`CoreClient`, one of several API-server processes)."""

    settings: Settings
    core: Core
    store: PromptStore
    preprocess: Preprocessor
    metrics: Metrics
    tenants: TenantRegistry | None = None  # None = open mode
    rate_limiter: RateLimiter | SharedRateLimiter = field(default_factory=RateLimiter)
    draining: bool = False
    uploads: TaskUploads = field(init=False)  # stores uploads; creates queue per tenant, not in threads

    def __post_init__(self) -> None:
        self.uploads = TaskUploads(self.store, self.validate_upload)

    @classmethod
    async def start(
        cls,
        settings: Settings,
        *,
        store: PromptStore | None = None,
        metrics: Metrics | None = None,
        core: CoreAddress | None = None,
    ) -> Services:
        """Open the tenants and the store, then start the engine core in this process, or connect to the
        engine-core process at `core` (an API server); then the decoders."""
        tenants = open_tenants(settings, announce=core is None)  # first: a misconfiguration fails fast
        metrics = metrics or Metrics()
        cpus = available_cpus()
        with contextlib.ExitStack() as undo:  # undone if start-up fails from here on
            if store is None:
                store = open_settings_store(settings)
                undo.callback(store.close)
            engine_core: Core
            if core is None:
                engine_core = await LocalCore.start(settings, store, metrics)
                rate_limiter: RateLimiter | SharedRateLimiter = RateLimiter()
            else:
                # An API server: torch only transforms images here (the decode pool is the parallelism),
                # and never touches the device (a CUDA context per API server would cost each ~0.5 GB).
                torch.set_num_threads(1)
                engine_core = await CoreClient.connect(core)
                rate_limiter = SharedRateLimiter(core.rate_table)
            info = engine_core.info
            preprocess = Preprocessor(
                info.cfg,
                ImageLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels),
                # As many as the CPUs, counted before this process left the engine's: a request's
                # decode must not queue behind another's in a pool of one thread.
                settings.decode_threads or cpus,
                gpu_jpegs=info.gpu_decode,
                # What an API server hands the core must fit its arena, sized for pixels: a request's
                # block (its decoded images and its JPEGs) stays within its largest all-pixels one.
                jpeg_budget=None
                if core is None
                else jpeg_budget(settings, info.cfg.img_size, core.arena_bytes),
            )
            # Everything alive now (torch, FastAPI, the backbone's Python objects: ~250k tracked objects)
            # lives as long as the server. A full collection scans them all and holds the GIL for ~150 ms,
            # every thread stalled: those were the rare 100-200 ms latency spikes under load. Frozen, they
            # are left out of every collection (CPython's gc.freeze, meant for exactly this).
            gc.collect()
            gc.freeze()
            undo.pop_all()
        return cls(
            settings, engine_core, store, preprocess, metrics, tenants=tenants, rate_limiter=rate_limiter
        )

    @property
    def ready(self) -> bool:
        return self.core.ready and not self.draining

    @property
    def not_ready_reason(self) -> str:
        return "draining" if self.draining else "starting"

    def validate_upload(self, data: bytes) -> None:
        """Store-side validator: the artifact must fit this backbone and this bank."""
        meta = read_metadata(data, artifact_limits(self.settings))
        validate_for_backbone(meta, self.core.info.signature)
        _, P, _ = meta.prompt_shape
        try:
            check_fits_shape(P, meta.num_classes, self.settings.max_prompt_length, self.settings.max_classes)
        except TaskTooLarge as e:
            raise ArtifactError(e.field, str(e)) from None

    async def stop(self) -> None:
        self.draining = True
        try:
            await self.core.stop(timeout_s=self.settings.request_timeout_s)
        finally:
            self.preprocess.close()
            self.store.close()
            self.rate_limiter.close()
            gc.unfreeze()


def open_tenants(settings: Settings, *, announce: bool = True) -> TenantRegistry | None:
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
        if announce:
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
    if announce:
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
