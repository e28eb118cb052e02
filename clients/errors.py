"""One exception class per server error type; `parse_error(status, payload)` maps a reply to one.

Mirrors `server/errors.py` and the router's own types in `server/api/errors.py`
(`method_not_allowed`, `http_error`): the server answers `{"error": {"type": ..., "message": ...}}`
with stable types, and each type has a class here, so callers can `except NotFound:`. Transport
failures (no reply at all) are `ConnectionFailed`, and its subclass `Timeout`.
"""

from __future__ import annotations

from typing import Any


class VPTError(Exception):
    """Base class of every error the SDK raises."""

    type = "error"

    def __init__(self, message: str, *, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status  # HTTP status, None for transport errors
        self.retry_after = retry_after  # seconds, from Retry-After on 429/503

    def __str__(self) -> str:
        return (
            f"{self.type}: {self.message}"
            if self.status is None
            else f"{self.status} {self.type}: {self.message}"
        )


class ConnectionFailed(VPTError):
    """The exchange with the server failed below HTTP: refused, DNS, a dropped connection, a timeout."""

    type = "connection_failed"


class Timeout(ConnectionFailed):
    """No connection, or no reply, within the client's `timeout` (httpx's connect/read/write/pool
    timeouts). A subclass of `ConnectionFailed`, so `except ConnectionFailed:` catches it too.

    Only a connect or pool timeout is retried (the request was never sent); after a read or write
    timeout the server may have acted on the request, so the SDK does not send it again."""

    type = "timeout"


class APIError(VPTError):
    """An error answered by the server."""

    type = "api_error"


class InvalidRequest(APIError):
    type = "invalid_request"


class InvalidImage(APIError):
    type = "invalid_image"


class InvalidTaskId(APIError):
    type = "invalid_task_id"


class InvalidArtifact(APIError):
    type = "invalid_artifact"


class Unauthorized(APIError):
    type = "unauthorized"


class Forbidden(APIError):
    type = "forbidden"


class QuotaExceeded(APIError):
    type = "quota_exceeded"


class NotFound(APIError):
    type = "not_found"


class PayloadTooLarge(APIError):
    type = "payload_too_large"


class UnsupportedMediaType(APIError):
    type = "unsupported_media_type"


class Overloaded(APIError):
    type = "overloaded"


class DeadlineExceeded(APIError):
    type = "deadline_exceeded"


class Unavailable(APIError):
    type = "unavailable"


class StoreUnavailable(APIError):
    type = "store_unavailable"


class CorruptArtifact(APIError):
    type = "corrupt_artifact"


class InternalError(APIError):
    type = "internal"


class MethodNotAllowed(APIError):
    """405: the route exists, but not for this HTTP method."""

    type = "method_not_allowed"


class HTTPError(APIError):
    """Any other HTTP-level refusal by the server's router (a status without a domain error type)."""

    type = "http_error"


ERRORS: dict[str, type[APIError]] = {
    cls.type: cls
    for cls in (
        InvalidRequest,
        InvalidImage,
        InvalidTaskId,
        InvalidArtifact,
        Unauthorized,
        Forbidden,
        QuotaExceeded,
        NotFound,
        PayloadTooLarge,
        UnsupportedMediaType,
        Overloaded,
        DeadlineExceeded,
        Unavailable,
        StoreUnavailable,
        CorruptArtifact,
        InternalError,
        MethodNotAllowed,
        HTTPError,
    )
}

# When a reply is not our JSON (a proxy's HTML page, say), the status still says what happened.
_BY_STATUS: dict[int, type[APIError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    405: MethodNotAllowed,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    422: InvalidRequest,
    429: Overloaded,
    503: Unavailable,
    504: DeadlineExceeded,
}


def parse_error(status: int, payload: Any, retry_after: str | float | None = None) -> APIError:
    """The exception for an error reply. `payload` is the decoded JSON body (or anything else)."""
    wait = _retry_after_seconds(retry_after)
    err = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(err, dict) and isinstance(err.get("type"), str):
        cls = ERRORS.get(err["type"]) or _BY_STATUS.get(status, APIError)
        return cls(str(err.get("message", "")), status=status, retry_after=wait)
    cls = _BY_STATUS.get(status, InternalError if status >= 500 else APIError)
    text = payload if isinstance(payload, str) else ""
    return cls(text[:200] or f"HTTP {status}", status=status, retry_after=wait)


def _retry_after_seconds(value: str | float | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except (TypeError, ValueError):
        return None  # HTTP-date form: not sent by our server; fall back to backoff
