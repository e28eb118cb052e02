"""FastAPI dependencies as `Annotated` aliases, so route signatures read like types."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Depends, Path, Request

from prompt_store.base import InvalidId
from prompt_store.ids import check_id
from server.errors import InvalidTaskId, Unavailable
from server.services import Services


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant whose tasks they see, and their role."""

    tenant: str
    role: Literal["admin", "tenant"]


def get_services(request: Request) -> Services:
    services: Services | None = getattr(request.app.state, "services", None)
    if services is None:
        raise Unavailable("server is starting")
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_principal(request: Request, services: ServicesDep) -> Principal:
    # Open mode: every caller acts as the default tenant. Issue D adds API keys and roles.
    principal = Principal(tenant=services.settings.default_tenant, role="admin")
    request.state.tenant = principal.tenant  # for the access log and per-tenant metrics
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def task_id_param(
    task_id: Annotated[str, Path(description="Task id: [a-z0-9][a-z0-9._-]{0,63}", examples=["birds-v2"])],
) -> str:
    try:
        return check_id(task_id, "task_id")
    except InvalidId as e:
        raise InvalidTaskId(str(e)) from None


TaskId = Annotated[str, Depends(task_id_param)]
