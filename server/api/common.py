"""Shared pieces of the routers: error response docs, the id rule's schema, and awaiting work while
watching the client."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import Request

from prompt_store.ids import ID_MAX_LEN, ID_PATTERN
from server.api.schemas import ErrorResponse

T = TypeVar("T")

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": desc}
    for code, desc in {
        400: "Invalid input (image, id, body)",
        401: "Missing or invalid API key",
        403: "`tenant` used without the admin role, or (uploads) the tenant's task quota is full",
        404: "No such task for this tenant",
        413: "Body or image too large",
        415: "Unsupported Content-Type",
        422: "Invalid parameter or artifact",
        429: "Overloaded; retry after Retry-After seconds",
        503: "Not ready, shutting down, or store unavailable",
        504: "Deadline exceeded",
    }.items()
}


def id_rule_schema(schema: dict[str, Any]) -> None:
    """`json_schema_extra` for a tenant / task id / cursor parameter: declares the id rule
    (`prompt_store.ids`) on its string schema (also inside an optional's `anyOf`).

    Declared, not enforced by FastAPI: the route checks the rule itself and answers 400 (FastAPI's own
    `pattern=` would answer 422 first, with a less specific error).
    """
    for s in schema.get("anyOf", [schema]):
        if s.get("type") == "string":
            s.update(pattern=f"^{ID_PATTERN.pattern}$", maxLength=ID_MAX_LEN)


async def until_disconnect(request: Request) -> None:
    """Returns when the client goes away. Call only after the body has been read."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it (its queued images are freed)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(until_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        raise asyncio.CancelledError("client disconnected")
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
