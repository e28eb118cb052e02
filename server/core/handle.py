"""What the HTTP routes see of the engine core: one interface, whether the core (engine, prompt bank,
residency, fair scheduler) lives in this process (`LocalCore`) or in the engine-core process behind a
socket (`server.core.client.CoreClient`). Routes never reach past it into the scheduler or the engine.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prompt_store.artifact import BackboneSignature
from server.engine.batch import Output
from server.engine.engine import Engine
from server.metrics import LiveStats, TaskCounters
from server.preprocess import Pixels
from server.scheduler.types import Result
from vpt.config import ViTConfig


@dataclass(frozen=True)
class EngineInfo:
    """The engine's facts that do not change while it runs: what /v1/info shows and uploads check."""

    backbone_id: str
    spec: str
    fingerprint: str
    cfg: ViTConfig
    device: str
    dtype: str  # "float32", "bfloat16", ...
    # The core decodes JPEGs on its device (VPT_GPU_DECODE, nvJPEG available): the process that parses
    # a request leaves the JPEGs nvJPEG may decode encoded (`server.preprocess.Pixels`).
    gpu_decode: bool = False

    @classmethod
    def of(cls, engine: Engine) -> EngineInfo:
        bb = engine.backbone
        return cls(
            bb.backbone_id,
            bb.spec,
            bb.fingerprint,
            engine.cfg,
            str(engine.device),
            str(engine.dtype).removeprefix("torch."),
        )

    @property
    def signature(self) -> BackboneSignature:
        c = self.cfg
        return BackboneSignature(c.embed_dim, c.depth, self.fingerprint, self.backbone_id)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> EngineInfo:
        cfg = dict(d["cfg"], mean=tuple(d["cfg"]["mean"]), std=tuple(d["cfg"]["std"]))
        return cls(**{**d, "cfg": ViTConfig(**cfg)})


@dataclass(frozen=True)
class TaskState:
    """What the core knows of one task: its versions in the bank and its usage on this server."""

    resident_versions: list[int]
    usage: TaskCounters


class Admission:
    """Room held for a request's images between `Core.admit` and `Core.run` (or `release`)."""

    def __init__(self, tenant: str, n: int, tenant_max_queued: int | None) -> None:
        self.tenant, self.n, self.tenant_max_queued = tenant, n, tenant_max_queued
        self.held = True

    def release(self) -> None:
        """Give the room back (decoding failed, or the images are about to queue). Idempotent."""
        if self.held:
            self.held = False
            self._release()

    def _release(self) -> None:
        """What giving the room back takes: overridden by each core's admissions."""


class Core(ABC):
    """The engine core as the routes use it."""

    info: EngineInfo

    @property
    @abstractmethod
    def alive(self) -> bool:
        """False once the engine (or the engine-core process) has died: nothing can compute."""

    @property
    @abstractmethod
    def ready(self) -> bool:
        """Warmed up and serving."""

    @abstractmethod
    async def admit(self, tenant: str, n: int, tenant_max_queued: int | None) -> Admission:
        """Hold room in the queues for `n` images of `tenant` while the caller decodes them, so that
        a request the queue bounds would refuse is refused before any decode work (a flood must not
        cost decode CPU): Overloaded (429) now, else an admission for `run`."""

    @abstractmethod
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
        """One admitted request: its images (the JPEGs among them decoded on the core's device first)
        run once per output, all on one task version; the admission's room becomes their place in the
        queues; the task's usage counts the request once. Cancelling the awaiting coroutine frees its
        queued images."""

    @abstractmethod
    async def task_changed(self, tenant: str, task_id: str, version: int) -> None:
        """A task's current version changed (upload, replace, rollback): the next request, through any
        API server, runs on `version`. Returns once that holds."""

    @abstractmethod
    async def task_deleted(self, tenant: str, task_id: str) -> None:
        """A task was deleted: new requests find it gone; its usage counters are dropped."""

    @abstractmethod
    async def task_state(self, tenant: str, task_ids: list[str]) -> list[TaskState]:
        """Bank residency and usage of each task."""

    @abstractmethod
    async def live(self) -> LiveStats:
        """The bank's counters, the queued images and the batches in flight."""

    @abstractmethod
    def on_death(self, hook: Callable[[], None] | None) -> None:
        """Call `hook` (from any thread) when the engine dies, or the core's process does."""

    @abstractmethod
    async def stop(self, timeout_s: float) -> None:
        """In this process: drain (up to `timeout_s`) and stop the engine. An API server: disconnect."""
