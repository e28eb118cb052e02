"""Domain errors → HTTP, in one place: `{"error": {"type": ..., "message": ...}}`; under /v2 (the Open
Inference Protocol) the protocol's own shape, `{"error": "<message>"}`, with the same status codes."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope

from prompt_store import base as store
from server import errors

log = logging.getLogger(__name__)

# Store errors keep the store layer free of HTTP; here is where they become API errors.
_STORE_MAP: dict[type[Exception], type[errors.ServingError]] = {
    store.InvalidId: errors.InvalidTaskId,
    store.NotFound: errors.TaskNotFound,
    store.StoreUnavailable: errors.StoreUnavailable,
    store.CorruptArtifact: errors.CorruptArtifact,
    store.Conflict: errors.Unavailable,
    store.TaskLimitReached: errors.QuotaExceeded,
}


def route_path(scope: Scope) -> str:
    """The path the router matches: without the `root_path` the app is served under (`uvicorn
    --root-path`, or mounted in another app), which ASGI servers leave in `path`. Matching the raw path
    would let every request under a prefix past the gate."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def is_v2(path: str) -> bool:
    """A path of the Open Inference Protocol (`server.api.v2`)."""
    return path == "/v2" or path.startswith("/v2/")


def error_response(
    status: int, type_: str, message: str, headers: dict[str, str] | None = None, *, v2: bool = False
) -> JSONResponse:
    body = {"error": message} if v2 else {"error": {"type": type_, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


def to_serving_error(exc: Exception) -> errors.ServingError:
    if isinstance(exc, errors.ServingError):
        return exc
    if isinstance(exc, store.InvalidArtifact):
        return errors.InvalidArtifact(str(exc), field=exc.field)
    if isinstance(exc, store.InvalidId) and exc.field != "task_id":
        return errors.InvalidRequest(str(exc))  # a bad ?cursor= or tenant is not a bad task id
    for src, dst in _STORE_MAP.items():
        if isinstance(exc, src):
            return dst(str(exc))
    return errors.InternalError("internal server error")


def _v2(request: Request) -> bool:
    return is_v2(route_path(request.scope))


def install_error_handlers(app: FastAPI) -> None:
    async def domain(request: Request, exc: Exception) -> JSONResponse:
        err = to_serving_error(exc)
        if isinstance(err, errors.InternalError):
            log.error("unhandled error", exc_info=exc)
        return error_response(err.status, err.type, err.message, err.headers, v2=_v2(request))

    async def validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        parts = []
        for e in exc.errors():
            loc = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path"))
            parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
        return error_response(422, "invalid_request", "; ".join(parts) or "invalid request", v2=_v2(request))

    async def http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        type_ = {404: "not_found", 405: "method_not_allowed", 413: errors.PayloadTooLarge.type}.get(
            exc.status_code, "http_error"
        )
        message = str(exc.detail)
        # The router's bare "Not Found" / "Method Not Allowed": say what was asked (an encoded "/" in a
        # task id, e.g. `..%2Fx`, is decoded before routing and lands here). The path is client text:
        # shown as a repr, cut short.
        path = request.url.path
        shown = repr(path) if len(path) <= 100 else repr(path[:100]) + "..."
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route matches {request.method} {shown}"
        elif exc.status_code == 405 and message == "Method Not Allowed":
            message = f"{request.method} is not allowed on {shown}"
        return error_response(exc.status_code, type_, message, getattr(exc, "headers", None), v2=_v2(request))

    app.add_exception_handler(errors.ServingError, domain)
    app.add_exception_handler(store.StoreError, domain)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http)
    app.add_exception_handler(Exception, domain)
