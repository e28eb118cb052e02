"""GET /v1/info, /healthz, /readyz, /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import server
from server.api.common import ERRORS
from server.api.deps import PrincipalDep, ServicesDep
from server.api.schemas import BackboneInfo, BankInfo, InfoResponse, Limits
from server.services import Services

router = APIRouter(tags=["system"])


@router.get(
    "/v1/info", response_model=InfoResponse, responses=ERRORS, summary="Backbone, preprocessing, limits"
)
async def info(services: ServicesDep, _: PrincipalDep) -> InfoResponse:
    """Needs any valid API key (it reveals the backbone and the limits, nothing per tenant)."""
    bb, cfg, s = services.engine.backbone, services.engine.cfg, services.settings
    stats = services.engine.bank.stats()
    return InfoResponse(
        backbone=BackboneInfo(
            backbone_id=bb.backbone_id,
            spec=bb.spec,
            fingerprint=bb.fingerprint,
            embed_dim=cfg.embed_dim,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            patch_size=cfg.patch_size,
            image_size=cfg.img_size,
            resize_size=cfg.resize_size,
            mean=list(cfg.mean),
            std=list(cfg.std),
            device=str(services.engine.device),
            dtype=str(services.engine.dtype).removeprefix("torch."),
        ),
        limits=Limits(
            max_batch_size=s.max_batch_size,
            max_images_per_request=s.max_images_per_request,
            max_image_bytes=s.max_image_bytes,
            max_image_pixels=s.max_image_pixels,
            max_body_bytes=s.max_body_bytes,
            max_artifact_bytes=s.max_artifact_bytes,
            max_prompt_length=s.max_prompt_length,
            max_classes=s.max_classes,
            max_top_k=s.max_top_k,
            request_timeout_s=s.request_timeout_s,
        ),
        bank=BankInfo(
            capacity=stats.capacity,
            resident=stats.resident,
            allocated_bytes=stats.allocated_bytes,
            used_bytes=stats.used_bytes,
        ),
        batching=s.batching,
        version=server.__version__,
    )


@router.get(
    "/healthz",
    summary="Liveness: the process serves HTTP and its engine can compute",
    responses={503: {"description": "The engine process exited: restart the server"}},
)
async def healthz(request: Request, response: Response) -> dict[str, str]:
    services: Services | None = getattr(request.app.state, "services", None)
    if services is not None and not services.engine.alive:
        response.status_code = 503
        return {"status": "engine process exited"}
    return {"status": "ok"}


@router.get(
    "/readyz", summary="Readiness: warmed up and not draining", responses={503: {"description": "Not ready"}}
)
async def readyz(services: ServicesDep, response: Response) -> dict[str, str]:
    if not services.ready:
        response.status_code = 503
        return {"status": "draining" if services.draining else "starting"}
    return {"status": "ready"}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(services: ServicesDep) -> Response:
    return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)
