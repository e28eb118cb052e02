"""POST /v1/tasks/{task_id}/classify and /embed: thin — parse, decode, await the scheduler."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from server.api.bodies import read_images
from server.api.common import ERRORS, unless_disconnected
from server.api.deps import Principal, PrincipalDep, ServicesDep, TaskId
from server.api.schemas import ClassifyJSON, ClassifyResponse, EmbedResponse, Prediction, Timings
from server.engine.batch import Output
from server.errors import InvalidRequest
from server.preprocess import Pixels
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
    decode: Callable[[], Awaitable[Pixels]]  # decode + eval transform (JPEGs maybe left to the core)


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
    """Admit, decode and run one request's images on the engine core, once per output kind (the
    scheduler batches one kind at a time): /v1 and /v2 (`server.api.v2`) alike.

    Each output queues the n images again, and the scheduler bounds a tenant's queued images as it
    queues them, so admission holds room for all of them: a request the bound must refuse is refused
    before decoding, not after its first output ran. The first output to fail cancels the others
    (`Core.run`); the core counts the request in the task's usage.

    `route` labels `vpt_images_total`; `started` is when the request began (for `total_ms`)."""
    tenant, quotas = principal.tenant, principal.quotas
    core = services.core
    max_queued = quotas.max_queued_images if quotas else None
    admission = await core.admit(tenant, images.n * len(outputs), max_queued)  # refuse before decoding
    try:
        pixels = await images.decode()
        services.metrics.images_decoded.inc(images.n)
        t1 = time.perf_counter()
        work = core.run(
            admission,
            task_id,
            pixels,
            outputs,
            top_k=top_k,
            timeout_s=services.settings.request_timeout_s,
            weight=quotas.weight if quotas else 1.0,
        )
        results = await unless_disconnected(request, work)
    finally:
        admission.release()  # if decoding failed, or the work never started: its room goes back
    services.metrics.images.labels(route).inc(images.n)
    timings = Timings(
        decode_ms=(t1 - started) * 1000,  # reading the body included, as ever
        queue_ms=max(r.queue_s for r in results) * 1000,
        compute_ms=max(r.compute_s for r in results) * 1000,
        total_ms=(time.perf_counter() - started) * 1000,
        batch_size=results[0].batch_size,
    )
    return results, timings


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
