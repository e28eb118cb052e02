"""POST /v1/tasks/{task_id}/classify and /embed: thin — parse, decode, await the scheduler."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from fastapi import APIRouter, Query, Request

from server.api.bodies import read_images
from server.api.common import ERRORS, unless_disconnected
from server.api.deps import Principal, PrincipalDep, ServicesDep, TaskId
from server.api.schemas import ClassifyJSON, ClassifyResponse, EmbedResponse, Prediction, Timings
from server.engine.batch import Output
from server.errors import InvalidRequest
from server.scheduler.scheduler import DEFAULT_TOP_K
from server.scheduler.types import Result
from server.services import Services

router = APIRouter(prefix="/v1/tasks", tags=["inference"])

IMAGE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "images": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                    "required": ["images"],
                }
            },
            "application/json": {"schema": ClassifyJSON.model_json_schema()},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


async def _run(
    request: Request,
    services: Services,
    principal: Principal,
    task_id: str,
    output: Output,
    top_k: int | None,
) -> tuple[Result, Timings]:
    s = services.settings
    t0 = time.perf_counter()
    blobs, body_k = await read_images(request, max_body=s.max_body_bytes, max_images=s.max_images_per_request)
    k = top_k if top_k is not None else (body_k or DEFAULT_TOP_K)
    if k > s.max_top_k:
        raise InvalidRequest(f"top_k {k} exceeds the limit of {s.max_top_k}")
    (result,), timings = await run_images(
        request,
        services,
        principal,
        task_id,
        Images(len(blobs), lambda: services.preprocess(blobs)),
        (output,),
        top_k=k,
        route=output,
        started=t0,
    )
    return result, timings


@dataclass(frozen=True)
class Images:
    """A request's images before decoding: how many, and how to get them as the engine's input."""

    n: int  # images in the request
    decode: Callable[[], Awaitable[torch.Tensor]]  # → uint8 (n, 3, S, S): decode + eval transform


async def run_images(
    request: Request,
    services: Services,
    principal: Principal,
    task_id: str,
    images: Images,
    outputs: tuple[Output, ...],
    *,
    top_k: int,
    route: str,
    started: float,
) -> tuple[list[Result], Timings]:
    """Admit, decode and submit one request's images, once per output kind (the scheduler batches
    one kind at a time), and record the task's stats: /v1 and /v2 (`server.api.v2`) alike.

    Each submission queues the n images again, and the scheduler bounds a tenant's queued images as
    it queues them, so admission holds room for all of them: a request the bound must refuse is
    refused before decoding, not after its first submission ran. The first submission to fail
    cancels the others (their queued images are freed, no engine work is left running for them).

    `route` labels `vpt_images_total`; `started` is when the request began (for `total_ms`)."""
    tenant, quotas = principal.tenant, principal.quotas
    s = services.settings
    max_queued = quotas.max_queued_images if quotas else None
    with services.scheduler.admit(tenant, images.n * len(outputs), max_queued):  # refuse before decoding
        pixels = await images.decode()
    services.metrics.images_decoded.inc(images.n)
    t1 = time.perf_counter()
    jobs = [
        services.scheduler.submit(
            tenant,
            task_id,
            pixels,
            output=output,
            top_k=top_k,
            timeout_s=s.request_timeout_s,
            weight=quotas.weight if quotas else 1.0,
            tenant_max_queued=max_queued,
        )
        for output in outputs
    ]
    try:
        # One output (every /v1 request) awaits its submission alone: no task per request.
        work = _all(jobs) if len(jobs) > 1 else _listed(jobs[0])
        results = await unless_disconnected(request, work)
    except Exception:
        services.task_stats.record(tenant, task_id, images.n, ok=False)
        raise
    services.task_stats.record(tenant, task_id, images.n, ok=True)
    services.metrics.images.labels(route).inc(images.n)
    timings = Timings(
        decode_ms=(t1 - started) * 1000,  # reading the body included, as ever
        queue_ms=max(r.queue_s for r in results) * 1000,
        compute_ms=max(r.compute_s for r in results) * 1000,
        total_ms=(time.perf_counter() - started) * 1000,
        batch_size=results[0].batch_size,
    )
    return results, timings


async def _listed(job: Awaitable[Result]) -> list[Result]:
    return [await job]


async def _all(jobs: list[Coroutine[Any, Any, Result]]) -> list[Result]:
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


TopK = Annotated[
    int | None, Query(ge=1, description=f"Labels per image (default {DEFAULT_TOP_K}; also in a JSON body)")
]


@router.post(
    "/{task_id}/classify",
    response_model=ClassifyResponse,
    responses=ERRORS,
    openapi_extra=IMAGE_BODY,
    summary="Classify images with a task",
)
async def classify(
    task_id: TaskId, request: Request, services: ServicesDep, principal: PrincipalDep, top_k: TopK = None
) -> ClassifyResponse:
    """Images as multipart field `images` (one or more files), a raw image body, or JSON
    `{"images": ["<base64>", ...], "top_k": 5}`. Every image of the request runs on one task version."""
    result, timings = await _run(request, services, principal, task_id, "classify", top_k)
    assert result.predictions is not None
    preds = [
        [Prediction(label=p.label, index=p.index, score=p.score) for p in row] for row in result.predictions
    ]
    return ClassifyResponse(task_id=task_id, version=result.version, predictions=preds, timings=timings)


@router.post(
    "/{task_id}/embed",
    response_model=EmbedResponse,
    responses=ERRORS,
    openapi_extra=IMAGE_BODY,
    summary="CLS features of images under a task's prompts",
)
async def embed(
    task_id: TaskId, request: Request, services: ServicesDep, principal: PrincipalDep
) -> EmbedResponse:
    """Same bodies as classify; returns the final-norm CLS feature (D floats) per image."""
    result, timings = await _run(request, services, principal, task_id, "embed", None)
    assert result.features is not None
    return EmbedResponse(task_id=task_id, version=result.version, features=result.features, timings=timings)
