"""Task artifacts: upload (PUT), list, show, delete, rollback. Store I/O runs in threads."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from prompt_store.base import TaskInfo
from prompt_store.ids import ID_MAX_LEN
from server.api.bodies import SMALL_JSON_BYTES, read_artifact, read_model
from server.api.common import ERRORS, id_rule_schema
from server.api.deps import PrincipalDep, ServicesDep, TaskId
from server.api.schemas import RollbackRequest, TaskList, TaskOut, TaskUsage, VersionOut
from server.core.handle import TaskState
from server.services import Services

router = APIRouter(prefix="/v1/tasks", tags=["tasks"])

ARTIFACT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "A vpt-task/1 safetensors artifact (docs/artifact-format.md)",
        "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"artifact": {"type": "string", "format": "binary"}},
                    "required": ["artifact"],
                }
            },
        },
    }
}


async def task_out(services: Services, info: TaskInfo) -> TaskOut:
    """One task as the API shows it, with its residency and usage from the engine core."""
    (state,) = await services.core.task_state(info.tenant, [info.task_id])
    return _task_out(info, state, usage=True)


def _task_out(info: TaskInfo, state: TaskState, *, usage: bool) -> TaskOut:
    m = info.metadata
    return TaskOut(
        task_id=info.task_id,
        tenant=info.tenant,
        version=info.current.version,
        mode=m.mode,
        prompt_length=m.prompt_shape[1],
        num_classes=m.num_classes,
        labels=list(m.labels),
        backbone=m.backbone,
        backbone_fingerprint=m.backbone_fingerprint,
        name=m.name,
        description=m.description,
        size=info.current.size,
        created=info.current.created,
        versions=[
            VersionOut(version=v.version, sha256=v.sha256, size=v.size, created=v.created)
            for v in info.versions
        ],
        resident_versions=state.resident_versions,
        usage=TaskUsage(**vars(state.usage)) if usage else None,
    )


@router.put(
    "/{task_id}",
    response_model=TaskOut,
    status_code=200,
    responses={201: {"model": TaskOut, "description": "Task created"}, **ERRORS},
    openapi_extra=ARTIFACT_BODY,
    summary="Upload a task artifact (create or new version)",
)
async def upload(
    task_id: TaskId, request: Request, response: Response, services: ServicesDep, principal: PrincipalDep
) -> TaskOut:
    """Validated against the running backbone (fingerprint, shapes, limits) before it is stored.
    201 when the task is new, 200 for a new version of an existing task."""
    quotas = principal.quotas
    max_bytes = services.settings.max_artifact_bytes
    if quotas is not None:
        max_bytes = min(max_bytes, quotas.max_artifact_bytes)
    data = await read_artifact(request, max_bytes=max_bytes)
    tenant = principal.tenant
    # The store counts and creates in one step (TaskLimitReached → 403 quota_exceeded), so concurrent
    # uploads, other processes and replicas cannot take the tenant past its limit.
    max_tasks = quotas.max_tasks if quotas is not None else None
    existed, info = await services.uploads.put(tenant, task_id, data, max_tasks=max_tasks)
    await services.core.task_changed(tenant, task_id, info.current.version)
    response.status_code = 200 if existed else 201
    return await task_out(services, info)


@router.get("", response_model=TaskList, responses=ERRORS, summary="List the tenant's tasks")
async def list_tasks(
    services: ServicesDep,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[
        str | None,
        Query(
            description="`next_cursor` of the previous page (a task id)",
            max_length=ID_MAX_LEN,
            json_schema_extra=id_rule_schema,
        ),
    ] = None,
) -> TaskList:
    page = await asyncio.to_thread(services.store.list_tasks, principal.tenant, limit, cursor)
    states = await services.core.task_state(principal.tenant, [t.task_id for t in page.items])
    return TaskList(
        tasks=[_task_out(t, state, usage=False) for t, state in zip(page.items, states, strict=True)],
        next_cursor=page.next_cursor,
    )


@router.get("/{task_id}", response_model=TaskOut, responses=ERRORS, summary="Show a task")
async def get_task(task_id: TaskId, services: ServicesDep, principal: PrincipalDep) -> TaskOut:
    info = await asyncio.to_thread(services.store.info, principal.tenant, task_id)
    return await task_out(services, info)


@router.delete("/{task_id}", status_code=204, responses=ERRORS, summary="Delete a task and all its versions")
async def delete_task(task_id: TaskId, services: ServicesDep, principal: PrincipalDep) -> Response:
    await asyncio.to_thread(services.store.delete, principal.tenant, task_id)
    await services.core.task_deleted(principal.tenant, task_id)
    return Response(status_code=204)


# Declared here, read by the route (`read_model`): a `body: RollbackRequest` parameter would have
# FastAPI read the whole body, with no limit, before the route runs.
ROLLBACK_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": RollbackRequest.model_json_schema()}},
    }
}


@router.post(
    "/{task_id}/rollback",
    response_model=TaskOut,
    responses=ERRORS,
    openapi_extra=ROLLBACK_BODY,
    summary="Make a retained version current",
)
async def rollback(
    task_id: TaskId, request: Request, services: ServicesDep, principal: PrincipalDep
) -> TaskOut:
    limit = min(services.settings.max_body_bytes, SMALL_JSON_BYTES)
    body = await read_model(request, RollbackRequest, limit=limit)
    store, tenant = services.store, principal.tenant

    def do() -> TaskInfo:
        store.set_current(tenant, task_id, body.version)
        return store.info(tenant, task_id)

    info = await asyncio.to_thread(do)
    await services.core.task_changed(tenant, task_id, info.current.version)
    return await task_out(services, info)
