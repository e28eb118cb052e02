"""Domain errors → HTTP, in one place: `{"error": {"type": ..., "message": ...}}`."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

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


def error_response(
    status: int, type_: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "message": message}}, status_code=status, headers=headers)


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


def install_error_handlers(app: FastAPI) -> None:
    async def domain(_: Request, exc: Exception) -> JSONResponse:
        err = to_serving_error(exc)
        if isinstance(err, errors.InternalError):
            log.error("unhandled error", exc_info=exc)
        return error_response(err.status, err.type, err.message, err.headers)

    async def validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        parts = []
        for e in exc.errors():
            loc = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path"))
            parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
        return error_response(422, "invalid_request", "; ".join(parts) or "invalid request")

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
        return error_response(exc.status_code, type_, message, getattr(exc, "headers", None))

    app.add_exception_handler(errors.ServingError, domain)
    app.add_exception_handler(store.StoreError, domain)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http)
    app.add_exception_handler(Exception, domain)
