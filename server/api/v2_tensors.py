"""Open Inference Protocol (KServe v2 REST) tensors: an inference request's JSON header and binary
section → named arrays, and named arrays → a response, in JSON or with the binary tensor data
extension.

Follows the KServe v2 protocol (kserve/open-inference-protocol, `rest_predict_v2.yaml`) and Triton's
binary tensor data extension (`docs/protocol/extension_binary_data.md`): the body is a JSON header of
`Inference-Header-Content-Length` bytes, then each binary tensor's bytes in the order of the tensors
that declare a `binary_data_size`; a BYTES element in binary form is a 4-byte little-endian length
followed by its bytes. Pure: no HTTP, no model.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.errors import InvalidRequest

# The protocol's numeric datatypes, little-endian as the binary extension sends them.
NUMERIC: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
DATATYPES = (*NUMERIC, "BYTES")
_LEN = struct.Struct("<I")  # a BYTES element's length prefix


@dataclass(frozen=True)
class InputTensor:
    name: str  # the model input it feeds
    datatype: str  # one of DATATYPES
    shape: tuple[int, ...]  # as declared, batch dimension first
    value: np.ndarray  # `shape`; BYTES: an object array of `bytes`
    binary: bool  # sent in the binary section (else as JSON `data`; BYTES then are UTF-8 strings)


@dataclass(frozen=True)
class RequestedOutput:
    name: str  # the model output asked for
    binary: bool  # answer it in the binary section


@dataclass(frozen=True)
class InferRequest:
    id: str | None  # echoed in the response
    inputs: dict[str, InputTensor]  # by name
    outputs: list[RequestedOutput] | None  # None: every output the model has
    binary_outputs: bool  # request parameter `binary_data_output`: the default for outputs
    parameters: dict[str, Any]  # request-level parameters (e.g. `top_k`)


@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str  # one of DATATYPES
    value: np.ndarray  # BYTES: an object array of `bytes` or `str`
    binary: bool  # encode in the binary section


def parse_request(body: bytes, header_length: str | None) -> InferRequest:
    """An inference request body → its tensors; InvalidRequest (400) naming whatever is wrong."""
    if header_length is None:
        header, binary = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise InvalidRequest("Inference-Header-Content-Length must be an integer") from None
        if not 0 <= n <= len(body):
            raise InvalidRequest(
                f"Inference-Header-Content-Length {n} is outside the body of {len(body)} bytes"
            )
        header, binary = body[:n], body[n:]
    try:
        payload = json.loads(header)
    except RecursionError:
        raise InvalidRequest("malformed JSON header: nested too deeply") from None
    except ValueError as e:
        raise InvalidRequest(f"malformed JSON header: {e}") from None
    if not isinstance(payload, dict):
        raise InvalidRequest("the inference request must be a JSON object")
    params = _parameters(payload, "request")
    raw_inputs = payload.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidRequest('the inference request needs a non-empty "inputs" list')
    inputs: dict[str, InputTensor] = {}
    offset = 0
    for i, item in enumerate(raw_inputs):
        tensor, offset = _input(item, i, binary, offset)
        if tensor.name in inputs:
            raise InvalidRequest(f"input {tensor.name!r} is given twice")
        inputs[tensor.name] = tensor
    if offset != len(binary):
        raise InvalidRequest(
            f"the binary section has {len(binary)} bytes but the inputs' binary_data_size add up to {offset}"
        )
    binary_default = params.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise InvalidRequest('parameter "binary_data_output" must be a boolean')
    outputs = None
    if payload.get("outputs") is not None:
        outputs = _outputs(payload["outputs"], binary_default)
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidRequest('"id" must be a string')
    return InferRequest(request_id, inputs, outputs, binary_default, params)


def _parameters(obj: dict[str, Any], where: str) -> dict[str, Any]:
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidRequest(f'{where} "parameters" must be an object')
    return params


def _input(item: Any, i: int, binary: bytes, offset: int) -> tuple[InputTensor, int]:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise InvalidRequest(f'inputs[{i}] must be an object with a "name"')
    name, datatype, shape = item["name"], item.get("datatype"), item.get("shape")
    if datatype not in DATATYPES:
        raise InvalidRequest(f"input {name!r}: datatype {datatype!r} is not one of {', '.join(DATATYPES)}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InvalidRequest(f'input {name!r}: "shape" must be a list of non-negative integers')
    count = math.prod(shape)
    size = _parameters(item, f"input {name!r}").get("binary_data_size")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidRequest(f"input {name!r}: binary_data_size must be a non-negative integer")
        if offset + size > len(binary):
            raise InvalidRequest(
                f"input {name!r}: binary_data_size {size} runs past the binary section "
                f"({len(binary) - offset} bytes left)"
            )
        if "data" in item:
            raise InvalidRequest(f'input {name!r}: give either "data" or binary_data_size, not both')
        chunk = binary[offset : offset + size]
        value = _from_binary(name, datatype, count, chunk)
        offset += size
    elif "data" in item:
        value = _from_json(name, datatype, count, item["data"])
    else:
        raise InvalidRequest(f'input {name!r} has neither "data" nor a binary_data_size parameter')
    return InputTensor(name, datatype, tuple(shape), value.reshape(shape), size is not None), offset


def _from_binary(name: str, datatype: str, count: int, chunk: bytes) -> np.ndarray:
    if datatype == "BYTES":
        items, pos = [], 0
        while pos < len(chunk):
            if pos + 4 > len(chunk):
                raise InvalidRequest(f"input {name!r}: a BYTES element's length prefix is cut short")
            (n,) = _LEN.unpack_from(chunk, pos)
            if pos + 4 + n > len(chunk):
                raise InvalidRequest(f"input {name!r}: a BYTES element runs past its binary data")
            items.append(chunk[pos + 4 : pos + 4 + n])
            pos += 4 + n
        if len(items) != count:
            raise InvalidRequest(f"input {name!r}: {len(items)} BYTES elements for a shape of {count}")
        out = np.empty(len(items), dtype=object)
        out[:] = items
        return out
    dtype = NUMERIC[datatype]
    if len(chunk) != count * dtype.itemsize:
        raise InvalidRequest(
            f"input {name!r}: {len(chunk)} bytes of {datatype} for a shape of {count} elements "
            f"({count * dtype.itemsize} bytes)"
        )
    return np.frombuffer(chunk, dtype=dtype)


def _flatten(data: Any, out: list[Any]) -> None:
    # Iterative: a deeply nested list must not overflow the stack.
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            out.append(item)


def _from_json(name: str, datatype: str, count: int, data: Any) -> np.ndarray:
    flat: list[Any] = []
    _flatten(data, flat)
    if len(flat) != count:
        raise InvalidRequest(f"input {name!r}: {len(flat)} values for a shape of {count} elements")
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in flat):
            raise InvalidRequest(f"input {name!r}: BYTES data in JSON must be strings")
        out = np.empty(len(flat), dtype=object)
        out[:] = [v.encode() for v in flat]
        return out
    dtype = NUMERIC[datatype]
    if datatype == "BOOL":
        ok = all(isinstance(v, bool) for v in flat)
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        ok = all(type(v) is int and info.min <= v <= info.max for v in flat)
    else:
        ok = all(type(v) in (int, float) for v in flat)
    if not ok:
        raise InvalidRequest(f"input {name!r}: data must be {datatype} values")
    return np.asarray(flat, dtype=dtype)


def _outputs(raw: Any, binary_default: bool) -> list[RequestedOutput]:
    if not isinstance(raw, list):
        raise InvalidRequest('"outputs" must be a list')
    out: list[RequestedOutput] = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidRequest(f'outputs[{i}] must be an object with a "name"')
        binary = _parameters(item, f"output {item['name']!r}").get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise InvalidRequest(f"output {item['name']!r}: binary_data must be a boolean")
        if any(o.name == item["name"] for o in out):
            raise InvalidRequest(f"output {item['name']!r} is asked for twice")
        out.append(RequestedOutput(item["name"], binary))
    return out


def _bytes_element(v: bytes | str) -> bytes:
    return v.encode() if isinstance(v, str) else v


def encode_response(header: dict[str, Any], outputs: list[OutputTensor]) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when a binary section follows (the value of
    `Inference-Header-Content-Length`; None for a pure JSON body)."""
    tensors, chunks = [], []
    for o in outputs:
        t: dict[str, Any] = {"name": o.name, "datatype": o.datatype, "shape": list(o.value.shape)}
        flat = o.value.reshape(-1)
        if o.binary:
            if o.datatype == "BYTES":
                raw = b"".join(_LEN.pack(len(b)) + b for b in map(_bytes_element, flat))
            else:
                raw = np.ascontiguousarray(flat, dtype=NUMERIC[o.datatype]).tobytes()
            t["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif o.datatype == "BYTES":
            t["data"] = [_bytes_element(v).decode("utf-8", "replace") for v in flat]
        else:
            t["data"] = flat.astype(NUMERIC[o.datatype]).tolist()
        tensors.append(t)
    head = json.dumps({**header, "outputs": tensors}, separators=(",", ":")).encode()
    if not chunks:
        return head, None
    return head + b"".join(chunks), len(head)
