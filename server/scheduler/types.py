"""Data passed between the API and the scheduler (no tensors leave the scheduler except images in)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import torch

from server.engine.batch import Output


@dataclass
class Prediction:
    label: str  # class name from the task artifact
    index: int  # class index in the task's head
    score: float  # softmax probability


@dataclass
class Result:
    """What a request gets back: one entry per image, all computed with one task version."""

    version: int  # task version every image of this request ran on
    predictions: list[list[Prediction]] | None  # classify: top-k per image
    features: list[list[float]] | None  # embed: CLS feature per image
    queue_s: float  # enqueue → dispatch
    compute_s: float  # the batch's engine time
    batch_size: int  # images in the forward pass this request rode in


@dataclass(eq=False)  # identity semantics: requests are queued and removed by identity
class Request:
    tenant: str  # namespace of the task
    task_id: str  # task within the tenant
    images: torch.Tensor  # (n, 3, H, W) uint8, already preprocessed
    output: Output  # "classify" | "embed"
    top_k: int  # classify: labels per image
    deadline: float  # time.monotonic() after which the request fails with 504
    future: asyncio.Future[Result]  # resolved by the scheduler
    enqueued: float = field(default_factory=time.monotonic)  # monotonic time it was queued
    dispatched: float = 0.0  # monotonic time its batch was dispatched

    @property
    def n(self) -> int:
        return int(self.images.shape[0])

    @property
    def task(self) -> tuple[str, str]:
        return (self.tenant, self.task_id)

    @property
    def done(self) -> bool:
        return self.future.done()
