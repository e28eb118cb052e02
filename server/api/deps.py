"""FastAPI dependencies as `Annotated` aliases, so route signatures read like types.

They are `async def` although they do not await: FastAPI runs plain `def` dependencies in a thread
pool, which cost more than the dependencies themselves (measured: ~0.5 ms of CPU per request).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Depends, Path, Query, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from prompt_store.base import InvalidId
from prompt_store.ids import ID_MAX_LEN, ID_PATTERN, check_id
from server.api.common import id_rule_schema
from server.bearer import bearer_credential
from server.errors import Forbidden, InvalidRequest, InvalidTaskId, Overloaded, Unauthorized, Unavailable
from server.services import Services
from server.tenants import Tenant, TenantRegistry


@dataclass(frozen=True)
class Principal:
    """Who is calling and on whose tasks they act."""

    tenant: str  # the tenant whose tasks this request reads and writes
    role: Literal["admin", "tenant"]  # the caller's role
    caller: str  # the authenticated tenant (differs from `tenant` when an admin acts for another)
    quotas: Tenant | None  # the acting tenant's quotas; None in open mode (server limits only)


async def get_services(request: Request) -> Services:
    services: Services | None = getattr(request.app.state, "services", None)
    if services is None:
        raise Unavailable("server is starting")
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


BEARER = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`")


async def get_principal(
    request: Request,
    services: ServicesDep,
    tenant: Annotated[
        str | None,
        Query(
            description="Admins only: act on this tenant's tasks instead of their own",
            max_length=ID_MAX_LEN,
            json_schema_extra=id_rule_schema,
        ),
    ] = None,
    _scheme: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)] = None,
) -> Principal:
    """The caller RateGate authenticated and charged, and the tenant it acts on.

    `_scheme` only declares the bearer scheme in OpenAPI (it never refuses): `authenticate` checks the
    header itself, with an error that says what is wrong."""
    registry = services.tenants
    if registry is None:  # open mode
        caller: Tenant | None = None
        name, role = services.settings.default_tenant, "admin"
    else:
        # RateGate (server/api/middleware.py) authenticated and charged every API request already, and
        # answered the 401s. Only while the server starts does it let a request by unchecked; one that
        # reaches a route after the start has finished is refused as if it had come a moment earlier.
        caller = request.scope.get("state", {}).get("admitted_caller")
        if caller is None:
            raise Unavailable("server is starting")
        name, role = caller.name, caller.role
    acting, quotas = name, caller
    if tenant is not None and tenant != name:
        if role != "admin":
            raise Forbidden("only admins may act on another tenant's tasks (the 'tenant' parameter)")
        try:
            acting = check_id(tenant, "tenant")
        except InvalidId as e:
            raise InvalidRequest(str(e)) from None
        quotas = registry.get(acting) if registry is not None else None
    request.state.tenant = acting  # for the access log and per-tenant metrics
    return Principal(tenant=acting, role=role, caller=name, quotas=quotas)  # type: ignore[arg-type]


PrincipalDep = Annotated[Principal, Depends(get_principal)]


# Said to HTTP clients and to `vpt` users alike: the header for the one, the variable for the other.
MISSING_KEY = (
    "missing API key: send the header 'Authorization: Bearer <key>' (the vpt CLI and the Python SDK "
    "send $VPT_API_KEY)"
)


def authenticate(registry: TenantRegistry, authorization: str) -> Tenant:
    """The tenant an `Authorization: Bearer <key>` header belongs to, or Unauthorized."""
    registry.maybe_reload()
    if not authorization.partition(" ")[0]:
        raise Unauthorized(MISSING_KEY)
    key = bearer_credential(authorization)
    if key is None:
        raise Unauthorized("the Authorization header must be 'Bearer <key>'")
    caller = registry.authenticate(key)
    if caller is None:
        raise Unauthorized("invalid API key")
    return caller


def charge_rate(services: Services, caller: Tenant) -> None:
    """Take one request from the caller's token bucket, or Overloaded (429 + Retry-After)."""
    wait = services.rate_limiter.acquire(caller.name, caller.rate_per_s, caller.burst)
    if wait > 0:
        services.metrics.rejected("rate_limited")
        raise Overloaded(
            f"tenant {caller.name!r} is over its rate of {caller.rate_per_s:g} requests/s", retry_after=wait
        )


async def task_id_param(
    task_id: Annotated[
        str,
        Path(
            description=f"Task id: {ID_PATTERN.pattern}",
            examples=["birds-v2"],
            json_schema_extra=id_rule_schema,
        ),
    ],
) -> str:
    try:
        return check_id(task_id, "task_id")
    except InvalidId as e:
        raise InvalidTaskId(str(e)) from None


TaskId = Annotated[str, Depends(task_id_param)]
