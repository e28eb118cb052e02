"""Python SDK for vpt-serve: `Client` (sync) and `AsyncClient` (asyncio), both over httpx.

Each public method builds a `_Call` (method, path, body, result type) with the same pure functions, so
the two clients differ only in how they send it. Retries: 429 and 503 refusals that did nothing
(`overloaded`, `unavailable`; `store_unavailable` too, except for uploads), honouring Retry-After,
and failures before the request was sent (connection refused, connect or pool timeout), with capped
exponential backoff and jitter. A read or write timeout, or a connection dropped mid-exchange, is not
retried: the server may already have acted on the request (an upload would add a version twice).
Errors: an error reply raises its `clients.errors` class; a transport failure raises
`ConnectionFailed`, or its subclass `Timeout` when the `timeout` (seconds, for each of connect, read,
write and pool) ran out; never a raw httpx exception. Task ids are percent-encoded in request paths.
Depends on httpx and pydantic only (Pillow and numpy are used when you pass such images).
"""

from __future__ import annotations

import asyncio
import io
import mimetypes
import os
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from clients.errors import (
    APIError,
    ConnectionFailed,
    Overloaded,
    StoreUnavailable,
    Timeout,
    Unavailable,
    parse_error,
)
from clients.types import ClassifyResult, EmbedResult, ServerInfo, TaskInfo, TaskList

T = TypeVar("T", bound=BaseModel)
DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = (429, 503)


def _worth_retrying(error: APIError, method: str) -> bool:
    """Whether a 429/503 refusal may be sent again after a wait. A full queue or a draining server did
    nothing with the request. After `store_unavailable` a read can be repeated, but an upload may have
    committed before the store failed to answer: sending it again could add a second version. A
    corrupt stored artifact stays corrupt."""
    if isinstance(error, Overloaded | Unavailable):
        return True
    return isinstance(error, StoreUnavailable) and method != "PUT"


ImageInput = Any  # str | os.PathLike | bytes | PIL.Image.Image | numpy.ndarray


@dataclass
class _Call:
    method: str
    path: str
    result: type[BaseModel] | None  # None: no body expected (204)
    params: dict[str, Any] = field(default_factory=dict)
    content: bytes | None = None
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)


def _encode_image(img: ImageInput, i: int) -> tuple[str, bytes, str]:
    """One image → (filename, bytes, content type). Arrays and PIL images are sent as PNG (lossless)."""
    if isinstance(img, bytes | bytearray | memoryview):
        return (f"image{i}", bytes(img), "application/octet-stream")
    if isinstance(img, str | os.PathLike):
        p = Path(img)
        return (p.name, p.read_bytes(), mimetypes.guess_type(p.name)[0] or "application/octet-stream")
    if hasattr(img, "save") and hasattr(img, "mode"):  # PIL.Image.Image
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return (f"image{i}.png", buf.getvalue(), "image/png")
    if hasattr(img, "__array_interface__"):  # numpy array, HxW or HxWxC uint8
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        return (f"image{i}.png", buf.getvalue(), "image/png")
    raise TypeError(
        f"image {i}: expected a path, bytes, a PIL image or a numpy array, not {type(img).__name__}"
    )


def _images(images: ImageInput | Iterable[ImageInput]) -> list[tuple[str, tuple[str, bytes, str]]]:
    single = isinstance(images, str | os.PathLike | bytes | bytearray | memoryview) or hasattr(images, "mode")
    if single or hasattr(images, "__array_interface__"):
        images = [images]
    files = [("images", _encode_image(img, i)) for i, img in enumerate(images)]  # type: ignore[union-attr]
    if not files:
        raise ValueError("no images given")
    return files


def _tenant(params: dict[str, Any], tenant: str | None) -> dict[str, Any]:
    return {**params, "tenant": tenant} if tenant else params


def _task_path(task: str, suffix: str = "") -> str:
    """`/v1/tasks/{task}{suffix}`, the id percent-encoded (a `/`, `?`, `#` or space stays in the id)."""
    return f"/v1/tasks/{quote(task, safe='')}{suffix}"


def classify_call(task: str, images: Any, top_k: int | None, tenant: str | None) -> _Call:
    params = _tenant({"top_k": top_k} if top_k else {}, tenant)
    return _Call("POST", _task_path(task, "/classify"), ClassifyResult, params=params, files=_images(images))


def embed_call(task: str, images: Any, tenant: str | None) -> _Call:
    return _Call(
        "POST", _task_path(task, "/embed"), EmbedResult, params=_tenant({}, tenant), files=_images(images)
    )


def upload_call(task: str, artifact: str | os.PathLike[str] | bytes, tenant: str | None) -> _Call:
    data = bytes(artifact) if isinstance(artifact, bytes | bytearray) else Path(artifact).read_bytes()
    return _Call(
        "PUT",
        _task_path(task),
        TaskInfo,
        params=_tenant({}, tenant),
        content=data,
        headers={"content-type": "application/octet-stream"},
    )


def tasks_call(limit: int, cursor: str | None, tenant: str | None) -> _Call:
    params = _tenant({"limit": limit, **({"cursor": cursor} if cursor else {})}, tenant)
    return _Call("GET", "/v1/tasks", TaskList, params=params)


def task_call(task: str, tenant: str | None) -> _Call:
    return _Call("GET", _task_path(task), TaskInfo, params=_tenant({}, tenant))


def delete_call(task: str, tenant: str | None) -> _Call:
    return _Call("DELETE", _task_path(task), None, params=_tenant({}, tenant))


def rollback_call(task: str, version: int, tenant: str | None) -> _Call:
    return _Call(
        "POST", _task_path(task, "/rollback"), TaskInfo, params=_tenant({}, tenant), json={"version": version}
    )


def info_call() -> _Call:
    return _Call("GET", "/v1/info", ServerInfo)


@dataclass
class RetryPolicy:
    max_retries: int = 3  # retries after the first attempt
    backoff_s: float = 0.25  # first backoff; doubles each retry
    max_backoff_s: float = 10.0  # cap on one wait (also caps a server's Retry-After)

    def delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_backoff_s)
        base = min(self.backoff_s * 2**attempt, self.max_backoff_s)
        return base * (0.5 + random.random() / 2)  # jitter: spread retries of many clients


class _Base:
    def __init__(
        self,
        url: str | None,
        api_key: str | None,
        timeout: float,
        retry: RetryPolicy | None,
    ) -> None:
        self.url = (url or os.environ.get("VPT_URL") or DEFAULT_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("VPT_API_KEY")
        self.timeout = timeout
        self.retry = retry or RetryPolicy()

    def _headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @staticmethod
    def _request_kwargs(call: _Call) -> dict[str, Any]:
        return {
            "params": call.params,
            "content": call.content,
            "files": call.files,
            "json": call.json,
            "headers": call.headers,
        }

    def _should_retry(self, attempt: int, response: httpx.Response | None, call: _Call) -> float | None:
        """Seconds to wait before retrying, or None to stop. `response` None: a failure before the
        request was sent (see `_failure`)."""
        if attempt >= self.retry.max_retries:
            return None
        if response is None:  # the request never reached the server
            return self.retry.delay(attempt, None)
        if response.status_code not in RETRY_STATUSES:
            return None
        error = self._error(response)
        return self.retry.delay(attempt, error.retry_after) if _worth_retrying(error, call.method) else None

    def _failure(self, call: _Call, e: httpx.RequestError) -> tuple[ConnectionFailed, bool]:
        """The SDK error for an httpx failure without a usable reply (transport, or a body that cannot be
        decoded), and whether a retry is safe (True only when the request was never sent: refused,
        connect timeout, no free pooled connection in time)."""
        where = f"{call.method} {self.url}{call.path}"
        if isinstance(e, httpx.TimeoutException):
            phase = {
                httpx.ConnectTimeout: "connecting",
                httpx.ReadTimeout: "waiting for the reply",
                httpx.WriteTimeout: "sending the request",
                httpx.PoolTimeout: "waiting for a free connection",
            }.get(type(e), "waiting")
            limit = f"{self.timeout:g} s" if isinstance(self.timeout, int | float) else str(self.timeout)
            unsent = isinstance(e, httpx.ConnectTimeout | httpx.PoolTimeout)
            return Timeout(f"timed out after {limit} {phase} ({type(e).__name__}, {where})"), unsent
        if isinstance(e, httpx.ConnectError):
            return ConnectionFailed(f"cannot reach {self.url}: {e}"), True
        return ConnectionFailed(f"{where} failed: {type(e).__name__}: {e}"), False

    @staticmethod
    def _error(response: httpx.Response) -> APIError:
        """The `clients.errors` exception for an error reply."""
        try:
            payload: Any = response.json()
        except ValueError:
            payload = response.text
        return parse_error(response.status_code, payload, response.headers.get("retry-after"))

    @classmethod
    def _result(cls, call: _Call, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            raise cls._error(response)
        if call.result is None:
            return None
        return call.result.model_validate(response.json())


class Client(_Base):
    """Synchronous client. Reuses connections; use as a context manager or call `close()`."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(url, api_key, timeout, retry)
        self._http = httpx.Client(
            base_url=self.url, timeout=timeout, headers=self._headers(), transport=transport
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: _Call) -> Any:
        attempt = 0
        while True:
            try:
                response = self._http.request(call.method, call.path, **self._request_kwargs(call))
            except httpx.RequestError as e:
                error, retryable = self._failure(call, e)
                wait = self._should_retry(attempt, None, call) if retryable else None
                if wait is None:
                    raise error from e
            else:
                wait = self._should_retry(attempt, response, call)
                if wait is None:
                    return self._result(call, response)
            time.sleep(wait)
            attempt += 1

    def classify(
        self, task: str, images: Any, *, top_k: int | None = None, tenant: str | None = None
    ) -> ClassifyResult:
        return self._send(classify_call(task, images, top_k, tenant))

    def embed(self, task: str, images: Any, *, tenant: str | None = None) -> EmbedResult:
        return self._send(embed_call(task, images, tenant))

    def upload(
        self, task: str, artifact: str | os.PathLike[str] | bytes, *, tenant: str | None = None
    ) -> TaskInfo:
        return self._send(upload_call(task, artifact, tenant))

    def tasks(self, *, limit: int = 100, cursor: str | None = None, tenant: str | None = None) -> TaskList:
        return self._send(tasks_call(limit, cursor, tenant))

    def task(self, task: str, *, tenant: str | None = None) -> TaskInfo:
        return self._send(task_call(task, tenant))

    def delete(self, task: str, *, tenant: str | None = None) -> None:
        self._send(delete_call(task, tenant))

    def rollback(self, task: str, version: int, *, tenant: str | None = None) -> TaskInfo:
        return self._send(rollback_call(task, version, tenant))

    def info(self) -> ServerInfo:
        return self._send(info_call())

    def health(self) -> bool:
        """True when the server is ready (warmed up, not draining)."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False


class AsyncClient(_Base):
    """asyncio client with the same methods as `Client`, as coroutines."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(url, api_key, timeout, retry)
        self._http = httpx.AsyncClient(
            base_url=self.url, timeout=timeout, headers=self._headers(), transport=transport
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _send(self, call: _Call) -> Any:
        attempt = 0
        while True:
            try:
                response = await self._http.request(call.method, call.path, **self._request_kwargs(call))
            except httpx.RequestError as e:
                error, retryable = self._failure(call, e)
                wait = self._should_retry(attempt, None, call) if retryable else None
                if wait is None:
                    raise error from e
            else:
                wait = self._should_retry(attempt, response, call)
                if wait is None:
                    return self._result(call, response)
            await asyncio.sleep(wait)
            attempt += 1

    async def classify(
        self, task: str, images: Any, *, top_k: int | None = None, tenant: str | None = None
    ) -> ClassifyResult:
        return await self._send(classify_call(task, images, top_k, tenant))

    async def embed(self, task: str, images: Any, *, tenant: str | None = None) -> EmbedResult:
        return await self._send(embed_call(task, images, tenant))

    async def upload(
        self, task: str, artifact: str | os.PathLike[str] | bytes, *, tenant: str | None = None
    ) -> TaskInfo:
        return await self._send(upload_call(task, artifact, tenant))

    async def tasks(
        self, *, limit: int = 100, cursor: str | None = None, tenant: str | None = None
    ) -> TaskList:
        return await self._send(tasks_call(limit, cursor, tenant))

    async def task(self, task: str, *, tenant: str | None = None) -> TaskInfo:
        return await self._send(task_call(task, tenant))

    async def delete(self, task: str, *, tenant: str | None = None) -> None:
        await self._send(delete_call(task, tenant))

    async def rollback(self, task: str, version: int, *, tenant: str | None = None) -> TaskInfo:
        return await self._send(rollback_call(task, version, tenant))

    async def info(self) -> ServerInfo:
        return await self._send(info_call())

    async def health(self) -> bool:
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False
