"""Typed domain errors with stable `type` strings; the API maps them to HTTP in one place.

The client SDK mirrors these types (one exception class per `type`), so the strings are part of the
public contract: add new ones, never rename.
"""

from __future__ import annotations


class ServingError(Exception):
    """Base class: `type` is the stable error type, `status` the HTTP status it maps to."""

    type = "internal"
    status = 500

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class InvalidRequest(ServingError):
    type, status = "invalid_request", 400


class InvalidImage(ServingError):
    type, status = "invalid_image", 400


class InvalidArtifact(ServingError):
    type, status = "invalid_artifact", 422

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class InvalidTaskId(ServingError):
    type, status = "invalid_task_id", 400


class Unauthorized(ServingError):
    type, status = "unauthorized", 401

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(ServingError):
    type, status = "forbidden", 403


class QuotaExceeded(ServingError):
    """A tenant quota (tasks, artifact bytes) would be exceeded."""

    type, status = "quota_exceeded", 403


class TaskNotFound(ServingError):
    type, status = "not_found", 404


class PayloadTooLarge(ServingError):
    type, status = "payload_too_large", 413


class UnsupportedMediaType(ServingError):
    type, status = "unsupported_media_type", 415


class Overloaded(ServingError):
    """A queue is full; the client should retry after `Retry-After` seconds."""

    type, status = "overloaded", 429

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, round(retry_after)))})


class DeadlineExceeded(ServingError):
    type, status = "deadline_exceeded", 504


class Unavailable(ServingError):
    """Not ready, shutting down, or a transient engine failure."""

    type, status = "unavailable", 503

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, round(retry_after)))})


class CorruptArtifact(ServingError):
    """A stored version fails its checksum or validation: only this task is affected."""

    type, status = "corrupt_artifact", 503


class StoreUnavailable(ServingError):
    type, status = "store_unavailable", 503


class InternalError(ServingError):
    type, status = "internal", 500
