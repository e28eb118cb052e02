"""GET /v1/info, /healthz, /readyz, /metrics (on the API port)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response, Security
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import server
from server.api.common import ERRORS
from server.api.deps import BEARER, PrincipalDep, ServicesDep, authenticate
from server.api.schemas import BackboneInfo, BankInfo, InfoResponse, Limits
from server.bearer import bearer_matches
from server.errors import Forbidden, Unauthorized
from server.services import Services

router = APIRouter(tags=["system"])


@router.get(
    "/v1/info", response_model=InfoResponse, responses=ERRORS, summary="Backbone, preprocessing, limits"
)
async def info(services: ServicesDep, _: PrincipalDep) -> InfoResponse:
    """Needs any valid API key (it reveals the backbone and the limits, nothing per tenant)."""
    bb, cfg, s = services.core.info, services.core.info.cfg, services.settings
    stats = (await services.core.live()).bank
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
            device=bb.device,
            dtype=bb.dtype,
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
    if services is not None and not services.core.alive:
        response.status_code = 503
        return {"status": "engine process exited"}
    return {"status": "ok"}


@router.get(
    "/readyz", summary="Readiness: warmed up and not draining", responses={503: {"description": "Not ready"}}
)
async def readyz(services: ServicesDep, response: Response) -> dict[str, str]:
    if not services.ready:
        response.status_code = 503
        return {"status": services.not_ready_reason}
    return {"status": "ready"}


# /metrics on the API port: included by `create_app` only without VPT_METRICS_PORT (with it, the
# metrics port serves them and this port answers 404, so nothing about tenants faces clients).
metrics_router = APIRouter(tags=["system"])


async def metrics_reader(
    request: Request,
    services: ServicesDep,
    _scheme: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)] = None,
) -> None:
    """Who may read /metrics here: the holder of VPT_METRICS_TOKEN when it is set, else an admin.

    The metrics name every tenant and show their traffic, which no tenant may see of another, so they
    are the operators': the token is what their Prometheus holds (a scrape credential that is not an
    API key, so Prometheus can do nothing else with it, and an admin key opens nothing here once it
    exists); without one, an admin's key lets the operator look without configuring anything. Open
    mode (loopback, development) has no keys: every caller is the admin there."""
    authorization = request.headers.get("authorization", "")
    token = services.settings.metrics_token
    if token is not None:
        if not bearer_matches(token, authorization):
            raise Unauthorized("send the metrics token: 'Authorization: Bearer <VPT_METRICS_TOKEN>'")
    elif services.tenants is not None and authenticate(services.tenants, authorization).role != "admin":
        raise Forbidden("only admins may read /metrics (or set VPT_METRICS_TOKEN for Prometheus)")


@metrics_router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    dependencies=[Depends(metrics_reader)],
    responses={
        401: ERRORS[401] | {"description": "Missing or wrong key (the metrics token when one is set)"},
        403: ERRORS[403] | {"description": "An API key without the admin role"},
    },
)
async def metrics(services: ServicesDep) -> Response:
    """Needs the metrics token (`VPT_METRICS_TOKEN`) when one is set, else an admin API key."""
    live = await services.core.live() if services.core.alive else None
    registry = services.metrics.exposition(lambda: live)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
