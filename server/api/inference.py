"""POST /v1/tasks/{task_id}/classify and /embed: thin — parse, decode, await the scheduler."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from server.api.bodies import read_images
from server.api.common import ERRORS, unless_disconnected
from server.api.deps import Principal, PrincipalDep, ServicesDep, TaskId
from server.api.schemas import ClassifyJSON, ClassifyResponse, EmbedResponse, Prediction, Timings
from server.errors import InvalidRequest
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
    request: Request, services: Services, principal: Principal, task_id: str, output: str, top_k: int | None
) -> tuple[Result, Timings]:
    tenant, quotas = principal.tenant, principal.quotas
    s = services.settings
    t0 = time.perf_counter()
    blobs, body_k = await read_images(request, max_body=s.max_body_bytes, max_images=s.max_images_per_request)
    k = top_k if top_k is not None else (body_k or 5)
    if k > s.max_top_k:
        raise InvalidRequest(f"top_k {k} exceeds the limit of {s.max_top_k}")
    max_queued = quotas.max_queued_images if quotas else None
    with services.scheduler.admit(tenant, len(blobs), max_queued):  # refuse before decoding
        images = await services.preprocess(blobs)
    services.metrics.images_decoded.inc(len(blobs))
    t1 = time.perf_counter()
    try:
        result = await unless_disconnected(
            request,
            services.scheduler.submit(
                tenant,
                task_id,
                images,
                output=output,
                top_k=k,
                timeout_s=s.request_timeout_s,
                weight=quotas.weight if quotas else 1.0,
                tenant_max_queued=max_queued,
            ),  # type: ignore[arg-type]
        )
    except Exception:
        services.task_stats.record(tenant, task_id, len(blobs), ok=False)
        raise
    services.task_stats.record(tenant, task_id, len(blobs), ok=True)
    services.metrics.images.labels(output).inc(len(blobs))
    timings = Timings(
        decode_ms=(t1 - t0) * 1000,
        queue_ms=result.queue_s * 1000,
        compute_ms=result.compute_s * 1000,
        total_ms=(time.perf_counter() - t0) * 1000,
        batch_size=result.batch_size,
    )
    return result, timings


TopK = Annotated[int | None, Query(ge=1, description="Labels per image (default 5; also in a JSON body)")]


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
