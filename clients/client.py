"""Python SDK for vpt-serve: `Client` (sync) and `AsyncClient` (asyncio), both over httpx.

Each public method builds a `_Call` (method, path, body, result type) with the same pure functions, so
the two clients differ only in how they send it. Retries, with capped exponential backoff and jitter:
429 and 503 refusals that did nothing (`overloaded`, `unavailable`; `store_unavailable` too for a
repeatable call), honouring Retry-After; failures before the request was sent (connection refused,
connect or pool timeout); and, for a repeatable call only, a connection closed or reset before any
reply (a keep-alive connection the server closed as the request went out). A call is repeatable when
sending it twice does what sending it once does (reads, classify, embed, rollback); an upload or a
delete that may have arrived is never resent. A read or write timeout is not retried: the server may
still be working on the request. Each retry is logged at INFO on the `clients.client` logger.
Errors: an error reply raises its `clients.errors` class; a transport failure raises
`ConnectionFailed`, or its subclass `Timeout` when the `timeout` (seconds, for each of connect, read,
write and pool) ran out; never a raw httpx exception. Task ids are percent-encoded in request paths.
Depends on httpx and pydantic only (Pillow and numpy are used when you pass such images).
"""

from __future__ import annotations

import asyncio
import io
import logging
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
log = logging.getLogger(__name__)


def _worth_retrying(error: APIError, call: _Call) -> bool:
    """Whether a 429/503 refusal may be sent again after a wait. A full queue or a draining server did
    nothing with the request. `store_unavailable` may come after the store committed (an upload's new
    version, a delete): only a repeatable call is sent again. A corrupt stored artifact stays corrupt."""
    if isinstance(error, Overloaded | Unavailable):
        return True
    return isinstance(error, StoreUnavailable) and call.repeatable


ImageInput = Any  # str | os.PathLike | bytes | PIL.Image.Image | numpy.ndarray


@dataclass
class _Call:
    method: str
    path: str
    result: type[BaseModel] | None  # None: no body expected (204)
    # Sending it twice does what sending it once does, so it is resent even when it may have arrived (a
    # connection lost before the reply, 503 store_unavailable). True for reads; for rollback (to a named
    # version: the same state, the same reply); for classify and embed, which change no task (a repeat
    # costs compute and counts once more in the tenant's usage, as a 429/503 retry already does). False
    # for an upload (a second version) and a delete (a repeat answers 404 to a delete that worked, or
    # deletes a task re-uploaded in between).
    repeatable: bool = False
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
    params = _tenant({"top_k": top_k} if top_k is not None else {}, tenant)
    return _Call(
        "POST",
        _task_path(task, "/classify"),
        ClassifyResult,
        repeatable=True,
        params=params,
        files=_images(images),
    )


def embed_call(task: str, images: Any, tenant: str | None) -> _Call:
    return _Call(
        "POST",
        _task_path(task, "/embed"),
        EmbedResult,
        repeatable=True,
        params=_tenant({}, tenant),
        files=_images(images),
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
    return _Call("GET", "/v1/tasks", TaskList, repeatable=True, params=params)


def task_call(task: str, tenant: str | None) -> _Call:
    return _Call("GET", _task_path(task), TaskInfo, repeatable=True, params=_tenant({}, tenant))


def delete_call(task: str, tenant: str | None) -> _Call:
    return _Call("DELETE", _task_path(task), None, params=_tenant({}, tenant))


def rollback_call(task: str, version: int, tenant: str | None) -> _Call:
    return _Call(
        "POST",
        _task_path(task, "/rollback"),
        TaskInfo,
        repeatable=True,
        params=_tenant({}, tenant),
        json={"version": version},
    )


def info_call() -> _Call:
    return _Call("GET", "/v1/info", ServerInfo, repeatable=True)


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

    def _after(
        self, attempt: int, call: _Call, outcome: httpx.Response | httpx.RequestError
    ) -> httpx.Response | float:
        """The one retry decision of both clients, after attempt number `attempt` (0 first): the reply to
        hand to `_result`, or seconds to wait before sending again. Raises the SDK error of a transport
        failure that is not retried."""
        if isinstance(outcome, httpx.Response):
            if outcome.status_code not in RETRY_STATUSES:
                return outcome
            error = self._error(outcome)
            if not _worth_retrying(error, call) or attempt >= self.retry.max_retries:
                return outcome
            wait, why = self.retry.delay(attempt, error.retry_after), f"{outcome.status_code} {error.type}"
        else:
            failure, safe = self._failure(call, outcome)
            if not safe or attempt >= self.retry.max_retries:
                raise failure from outcome
            wait, why = self.retry.delay(attempt, None), f"{type(outcome).__name__}: {outcome}"
        log.info("retry %d of %s %s in %.2f s after %s", attempt + 1, call.method, call.path, wait, why)
        return wait

    def _failure(self, call: _Call, e: httpx.RequestError) -> tuple[ConnectionFailed, bool]:
        """The SDK error for an httpx failure without a usable reply (transport, or a body that cannot be
        decoded), and whether sending the call again is safe. Always when the request never left
        (refused, connect timeout, no free pooled connection in time). For a repeatable call also when
        the connection was closed or reset before a complete reply: typically a pooled keep-alive
        connection the server closed as the request went out (httpx: RemoteProtocolError "Server
        disconnected without sending a response", or ReadError "connection reset"), but the server may
        also have read the request and died, so only what may be sent twice is. Never after a read or
        write timeout: the server may still be working on it, and resending piles work on a slow
        server."""
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
        lost = isinstance(e, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError)
        return ConnectionFailed(f"{where} failed: {type(e).__name__}: {e}"), lost and call.repeatable

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
            outcome: httpx.Response | httpx.RequestError
            try:
                outcome = self._http.request(call.method, call.path, **self._request_kwargs(call))
            except httpx.RequestError as e:
                outcome = e
            step = self._after(attempt, call, outcome)
            if isinstance(step, httpx.Response):
                return self._result(call, step)
            time.sleep(step)
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
            outcome: httpx.Response | httpx.RequestError
            try:
                outcome = await self._http.request(call.method, call.path, **self._request_kwargs(call))
            except httpx.RequestError as e:
                outcome = e
            step = self._after(attempt, call, outcome)
            if isinstance(step, httpx.Response):
                return self._result(call, step)
            await asyncio.sleep(step)
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
