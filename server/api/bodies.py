"""Reading request bodies: images as multipart, raw bytes or JSON base64; artifacts as raw or multipart;
small JSON requests as pydantic models.

Bodies are read with a byte limit (413 beyond it, also for chunked uploads without Content-Length),
then parsed; every malformed input is a 4xx naming the problem. No route lets FastAPI parse a body:
FastAPI reads a declared body whole, without a limit, before the route runs.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from server.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType
from server.settings import Settings

IMAGE_TYPES = ("image/", "application/octet-stream")
MULTIPART_OVERHEAD = 64 * 1024  # bytes an artifact's multipart envelope may add (boundaries, part headers)
SMALL_JSON_BYTES = 16 * 1024  # the limit of a small JSON request body (a rollback's is ~15 bytes)
M = TypeVar("M", bound=BaseModel)


def largest_body(settings: Settings) -> int:
    """The most bytes any route reads: the limit of the ASGI backstop (`middleware.BodyLimit`)."""
    return max(settings.max_body_bytes, settings.max_artifact_bytes + MULTIPART_OVERHEAD)


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing more than `limit` bytes without reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise PayloadTooLarge(f"body of {declared} bytes exceeds the limit of {limit}")
        except ValueError:
            raise InvalidRequest("invalid Content-Length header") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # Starlette re-reads the cached body for form parsing
    return body


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def _multipart_files(request: Request, field: str | tuple[str, ...], max_files: int) -> list[bytes]:
    fields = (field,) if isinstance(field, str) else field
    try:
        # One file over the limit still parses, so the caller can say how many were sent.
        form = await request.form(max_files=max_files + 1, max_fields=max_files + 16)
    except MultiPartException as e:
        raise InvalidRequest(f"malformed multipart body: {e.message}") from None
    except StarletteHTTPException as e:  # Starlette's own multipart limits
        raise InvalidRequest(f"multipart body rejected: {e.detail}") from None
    except Exception as e:  # python-multipart raises several types on garbage
        raise InvalidRequest(f"malformed multipart body: {e}") from None
    try:
        files = [v for f in fields for v in form.getlist(f)]
        out = []
        for v in files:
            if not isinstance(v, UploadFile):
                raise InvalidRequest(f"multipart field {fields[0]!r} must be a file, not text")
            out.append(await v.read())
        return out
    finally:
        await form.close()


async def read_images(request: Request, *, max_body: int, max_images: int) -> tuple[list[bytes], int | None]:
    """Images of a classify/embed request, and a top_k given in a JSON body."""
    media = _media_type(request)
    body = await read_body(request, max_body)
    top_k: int | None = None
    if media == "multipart/form-data":
        images = await _multipart_files(request, "images", max_images)
        if not images:
            raise InvalidRequest("multipart body has no 'images' file field")
    elif media == "application/json":
        images, top_k = _json_images(body)
    elif media.startswith(IMAGE_TYPES):
        images = [body]
    elif media == "":
        raise UnsupportedMediaType(
            "missing Content-Type: send multipart/form-data, application/json or image/*"
        )
    else:
        raise UnsupportedMediaType(
            f"Content-Type {media!r} not supported: send multipart/form-data, application/json or image/*"
        )
    if not images:
        raise InvalidRequest("no images in the request")
    if len(images) > max_images:
        raise InvalidRequest(f"{len(images)} images exceed the limit of {max_images} per request")
    return images, top_k


def _json_images(body: bytes) -> tuple[list[bytes], int | None]:
    try:
        payload = json.loads(body)
    except RecursionError:
        raise InvalidRequest("malformed JSON body: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, and over-long integers (Python >= 3.11)
        raise InvalidRequest(f"malformed JSON body: {e}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("images"), list):
        raise InvalidRequest('JSON body must be an object with an "images" list of base64 strings')
    top_k = payload.get("top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise InvalidRequest('"top_k" must be a positive integer')
    images = []
    for i, item in enumerate(payload["images"]):
        if not isinstance(item, str):
            raise InvalidRequest(f"images[{i}] must be a base64 string")
        images.append(decode_base64_image(item.encode("ascii", "replace"), i))
    return images, top_k


def decode_base64_image(data: bytes, i: int) -> bytes:
    """Image `i` of a JSON body (/v1 `images`, /v2 BYTES `data`): base64, or a data URL as browsers
    make them."""
    if data.startswith(b"data:") and b"," in data:
        data = data.split(b",", 1)[1]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"images[{i}] is not valid base64") from None


async def read_artifact(request: Request, *, max_bytes: int) -> bytes:
    """Artifact upload body: raw bytes, or multipart with a file field `artifact` (or `file`)."""
    media = _media_type(request)
    multipart = media == "multipart/form-data"
    body = await read_body(request, max_bytes + MULTIPART_OVERHEAD if multipart else max_bytes)
    if multipart:
        files = await _multipart_files(request, ("artifact", "file"), 1)
        if len(files) != 1:
            raise InvalidRequest("multipart upload needs exactly one file field 'artifact'")
        data = files[0]
        if len(data) > max_bytes:
            raise PayloadTooLarge(f"artifact of {len(data)} bytes exceeds the limit of {max_bytes}")
        return data
    if media in ("application/octet-stream", ""):
        if not body:
            raise InvalidRequest("empty artifact body")
        return body
    raise UnsupportedMediaType(
        f"Content-Type {media!r} not supported for uploads: send application/octet-stream or multipart"
    )


async def read_model(request: Request, model: type[M], *, limit: int) -> M:
    """A JSON body as `model`, read under `limit` bytes; errors as FastAPI's own body validation (422).

    Other Content-Types are refused (415; FastAPI refuses them too, with a 422): a browser sends a
    cross-site form or `text/plain` POST without a preflight, so a JSON route must not accept one."""
    media = _media_type(request)
    if media and media != "application/json" and not media.endswith("+json"):
        raise UnsupportedMediaType(f"Content-Type {media!r} not supported: send application/json")
    body = await read_body(request, limit)
    if not body.strip():
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required"}])
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False)) from None
