"""The messages between the API servers and the engine core, over one Unix stream socket per API server.

A frame is `<I` length, then `<BQ` kind and request id, then the payload. Per request: RESERVE (room
for its images, before decoding), RUN (where its decoded images, and the JPEGs left to the core's GPU
decoder, lie in the API server's shared-memory arena, and what to compute) or RELEASE, CANCEL (client
gone); answered by OK, RESULT or ERROR. The request's fields and results are `struct`s and UTF-8
strings; control calls (task changes, state queries) and errors are small JSON objects. Nothing is
pickled: a message can only ever be data.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from server.engine.batch import Output
from server.errors import InternalError, ServingError
from server.scheduler.types import Prediction, Result

# API server -> core
HELLO, RESERVE, RELEASE, RUN, CANCEL, CALL = range(1, 7)
# core -> API server
WELCOME, OK, RESULT, ERROR, ANSWER = range(11, 16)

_FRAME = struct.Struct("<IBQ")  # length of what follows the length, kind, request id
_HEAD = _FRAME.size - 4
_RESERVE = struct.Struct("<Ii")  # images, tenant's queue bound (-1: none); + tenant
_RUN = struct.Struct("<QHHHHffBBi")  # offset, n, h, w, top_k, timeout, weight, outputs, reserved, bound
_JPEG = struct.Struct("<HI")  # a JPEG left to the core: its position in the request, its length
_STATE = struct.Struct("<II")  # the tenant's queued images, all queued images: heads OK, RESULT, ERROR
UNKNOWN = 0xFFFFFFFF  # a state the core could not tell (the message naming the tenant was unreadable)
_RESULT = struct.Struct("<IHffBHH")  # version, batch size, queue s, compute s, output, rows, columns
_ENTRY = struct.Struct("<ifI")  # class index, score, label length (+ label)
OUTPUTS: tuple[Output, ...] = ("classify", "embed")

MAX_FRAME = 1 << 30  # a frame longer than this is a broken peer, not a message


def frame(kind: int, rid: int, payload: bytes = b"") -> bytes:
    return _FRAME.pack(_HEAD + len(payload), kind, rid) + payload


def _text(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<H", len(b)) + b


def _read_text(buf: memoryview, at: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<H", buf, at)
    return bytes(buf[at + 2 : at + 2 + n]).decode(), at + 2 + n


def encode_json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def decode_json(buf: memoryview) -> Any:
    return json.loads(bytes(buf))


# --- requests -------------------------------------------------------------------------------------


def encode_reserve(tenant: str, n: int, tenant_max_queued: int | None) -> bytes:
    return _RESERVE.pack(n, -1 if tenant_max_queued is None else tenant_max_queued) + _text(tenant)


def decode_reserve(buf: memoryview) -> tuple[str, int, int | None]:
    n, bound = _RESERVE.unpack_from(buf)
    tenant, _ = _read_text(buf, _RESERVE.size)
    return tenant, n, None if bound < 0 else bound


@dataclass(frozen=True)
class Run:
    """Where a request's images lie in the API server's arena, and what to compute. The block holds the
    decoded images, uint8 (n, 3, height, width), then the bytes of each JPEG left to the core's GPU
    decoder, one after another; `jpegs` gives each one's (position in the request, length)."""

    offset: int
    n: int  # decoded images in the block
    height: int
    width: int
    top_k: int
    timeout_s: float
    weight: float
    outputs: tuple[Output, ...]
    tenant: str
    task_id: str
    reserved: bool  # a RESERVE of the same id holds its room; else the core checks the bounds now
    tenant_max_queued: int | None
    jpegs: tuple[tuple[int, int], ...] = ()

    @property
    def pixel_bytes(self) -> int:
        return self.n * 3 * self.height * self.width

    @property
    def nbytes(self) -> int:
        return self.pixel_bytes + sum(length for _, length in self.jpegs)

    @property
    def images(self) -> int:
        """Images in the request."""
        return self.n + len(self.jpegs)

    def encode(self) -> bytes:
        mask = sum(1 << OUTPUTS.index(o) for o in self.outputs)
        order = 1 if self.outputs == ("embed", "classify") else 0  # both kinds: which came first
        bound = -1 if self.tenant_max_queued is None else self.tenant_max_queued
        head = _RUN.pack(self.offset, self.n, self.height, self.width, self.top_k, self.timeout_s, self.weight,
                         mask | order << 7, self.reserved, bound)  # fmt: skip
        jpegs = struct.pack("<H", len(self.jpegs)) + b"".join(_JPEG.pack(*j) for j in self.jpegs)
        return head + _text(self.tenant) + _text(self.task_id) + jpegs

    @classmethod
    def decode(cls, buf: memoryview) -> Run:
        offset, n, h, w, top_k, timeout_s, weight, mask, reserved, bound = _RUN.unpack_from(buf)
        outputs = tuple(o for i, o in enumerate(OUTPUTS) if mask >> i & 1)
        if mask >> 7:
            outputs = outputs[::-1]
        tenant, at = _read_text(buf, _RUN.size)
        task_id, at = _read_text(buf, at)
        (count,) = struct.unpack_from("<H", buf, at)
        jpegs = tuple(_JPEG.unpack_from(buf, at + 2 + k * _JPEG.size) for k in range(count))
        return cls(offset, n, h, w, top_k, timeout_s, weight, outputs, tenant, task_id,  # type: ignore[arg-type]
                   bool(reserved), None if bound < 0 else bound, jpegs)  # fmt: skip


# --- queue state: how full the core's queues were when it answered --------------------------------


def encode_state(tenant_queued: int, total_queued: int) -> bytes:
    return _STATE.pack(tenant_queued, total_queued)


def decode_state(buf: memoryview) -> tuple[tuple[int, int], memoryview]:
    """(the tenant's queued images, all queued images), and the rest of the answer."""
    return _STATE.unpack_from(buf), buf[_STATE.size :]


# --- results --------------------------------------------------------------------------------------


def encode_results(results: list[Result]) -> bytes:
    parts = [bytes([len(results)])]
    for r in results:
        if r.predictions is not None:
            rows, cols = len(r.predictions), len(r.predictions[0]) if r.predictions else 0
            parts.append(_RESULT.pack(r.version, r.batch_size, r.queue_s, r.compute_s, 0, rows, cols))
            for row in r.predictions:
                for p in row:
                    label = p.label.encode("utf-8", "surrogatepass")  # as the artifact's JSON had it
                    parts.append(_ENTRY.pack(p.index, p.score, len(label)) + label)
        else:
            assert r.features is not None
            rows, cols = len(r.features), len(r.features[0]) if r.features else 0
            parts.append(_RESULT.pack(r.version, r.batch_size, r.queue_s, r.compute_s, 1, rows, cols))
            parts.append(torch.tensor(r.features, dtype=torch.float32).numpy().tobytes())
    return b"".join(parts)


def decode_results(buf: memoryview) -> list[Result]:
    results, at = [], 1
    for _ in range(buf[0]):
        version, batch_size, queue_s, compute_s, kind, rows, cols = _RESULT.unpack_from(buf, at)
        at += _RESULT.size
        predictions, features = None, None
        if kind == 0:
            predictions = []
            for _ in range(rows):
                row = []
                for _ in range(cols):
                    index, score, n = _ENTRY.unpack_from(buf, at)
                    at += _ENTRY.size
                    row.append(
                        Prediction(bytes(buf[at : at + n]).decode("utf-8", "surrogatepass"), index, score)
                    )
                    at += n
                predictions.append(row)
        else:
            size = rows * cols * 4
            flat = torch.frombuffer(bytearray(buf[at : at + size]), dtype=torch.float32) if size else None
            features = [] if flat is None else flat.view(rows, cols).tolist()
            at += size
        results.append(Result(version, predictions, features, queue_s, compute_s, batch_size))
    return results


# --- framing --------------------------------------------------------------------------------------


class Framed(asyncio.Protocol):
    """A stream of frames: `on_message(kind, rid, payload)` for each one, in order, on the event loop;
    `send` writes one. `on_lost` when the peer is gone (or sent something that is not a frame)."""

    def __init__(
        self,
        on_message: Callable[[int, int, memoryview], None],
        on_lost: Callable[[Exception | None], None],
    ) -> None:
        self._on_message, self._on_lost = on_message, on_lost
        self._buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        at = 0
        while len(buf) - at >= 4:
            (length,) = struct.unpack_from("<I", buf, at)
            if length < _HEAD or length > MAX_FRAME:
                self._broken(ValueError(f"bad frame length {length}"))
                return
            if len(buf) - at - 4 < length:
                break
            _, kind, rid = _FRAME.unpack_from(buf, at)
            payload = memoryview(bytes(buf[at + _FRAME.size : at + 4 + length]))
            at += 4 + length
            self._on_message(kind, rid, payload)
        del buf[:at]

    def _broken(self, error: Exception) -> None:
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_lost(exc)

    def send(self, kind: int, rid: int, payload: bytes = b"") -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(kind, rid, payload))


# --- errors ---------------------------------------------------------------------------------------

_ERRORS = {c.__name__: c for c in (ServingError, *ServingError.__subclasses__())}


def encode_error(e: BaseException) -> bytes:
    """A request's error as the API server re-raises it: the same type, message and headers."""
    if not isinstance(e, ServingError):
        e = InternalError(f"engine core: {type(e).__name__}")
    return encode_json(
        {
            "class": type(e).__name__,
            "message": e.message,
            "headers": e.headers,
            "field": getattr(e, "field", None),
        }
    )


def decode_error(buf: memoryview) -> ServingError:
    d = decode_json(buf)
    cls = _ERRORS.get(d["class"], InternalError)
    e = cls.__new__(cls)
    ServingError.__init__(e, d["message"], headers=d["headers"])
    if d.get("field") is not None:
        e.field = d["field"]  # type: ignore[attr-defined]
    return e
