"""Open Inference Protocol (KServe v2 REST) tensors: an inference request's JSON header and binary
section → named arrays, and named arrays → a response, in JSON or with the binary tensor data
extension.

Follows the KServe v2 protocol (kserve/open-inference-protocol, `rest_predict_v2.yaml`) and Triton's
binary tensor data extension (`docs/protocol/extension_binary_data.md`): the body is a JSON header of
`Inference-Header-Content-Length` bytes, then each binary tensor's bytes in the order of the tensors
that declare a `binary_data_size`; a BYTES element in binary form is a 4-byte little-endian length
followed by its bytes. Pure: no HTTP, no model.

A request is read in two steps so that no work grows with sizes a client chose before they are
checked: `parse_request` reads the JSON header under its own byte limit and checks every input's
name, datatype and shape (a few dims, each an int64, elements no more than the data could hold), and
`InputTensor.decode` turns an input's data into an array only once the caller has checked the
declared shape against its own rules (the model's inputs, the server's limits).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server.errors import InvalidRequest, PayloadTooLarge

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

# The JSON header's limit. Tensor data in JSON is the slow, large way to send it: json.loads builds a
# Python object per value (a 4 MiB list of lists is ~100 MB and a second of CPU on the event loop),
# so pixels belong in the binary section. 4 MiB still takes a 224x224 RGB image as JSON `data`
# (150,528 values, 0.3-0.6 MB of text) or a full request of 64 base64'd JPEGs of ~45 KB.
MAX_HEADER_BYTES = 4 * 1024 * 1024
# Lists and objects in the header: a nested 224x224x3 `data` has ~50,400; a body of `[[0],[0],...]`
# would have one per 4 bytes. Counted on the raw bytes (brackets inside strings too) before parsing.
MAX_JSON_CONTAINERS = 65_536
MAX_DIMS = 8  # dims of an input's shape (the model's largest input has 4)
MAX_DIM = 2**63 - 1  # the protocol's shapes are int64


@dataclass(frozen=True)
class InputTensor:
    """An input as its header declares it; `decode()` reads its data."""

    name: str  # the model input it feeds
    datatype: str  # one of DATATYPES
    shape: tuple[int, ...]  # as declared, batch dimension first; at most MAX_DIMS dims
    count: int  # elements `shape` declares: no more than its data's bytes could hold
    binary: bool  # sent in the binary section (else as JSON `data`; BYTES then are UTF-8 strings)
    source: Any = field(repr=False)  # its bytes of the binary section, or its JSON `data` as parsed

    def decode(self) -> np.ndarray:
        """The data as an array of `shape` (BYTES: an object array of `bytes`); InvalidRequest (400)
        when it does not match the declared shape and datatype. Work is bounded by `count` and the
        data's size."""
        if self.binary:
            value = _from_binary(self.name, self.datatype, self.count, self.source)
        else:
            value = _from_json(self.name, self.datatype, self.count, self.source)
        return value.reshape(self.shape)


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


def parse_request(
    body: bytes, header_length: str | None, *, max_header_bytes: int = MAX_HEADER_BYTES
) -> InferRequest:
    """An inference request body → its declared tensors, data not decoded yet; InvalidRequest (400)
    naming whatever is wrong, PayloadTooLarge (413) for a JSON header over `max_header_bytes`."""
    if header_length is None:
        n = len(body)
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise InvalidRequest("Inference-Header-Content-Length must be an integer") from None
        if not 0 <= n <= len(body):
            raise InvalidRequest(f"Inference-Header-Content-Length is outside the body of {len(body)} bytes")
    if n > max_header_bytes:
        raise PayloadTooLarge(
            f"the JSON part of the request is {n} bytes, over the limit of {max_header_bytes}: "
            "send tensor data in binary (Inference-Header-Content-Length)"
        )
    header = body if n == len(body) else body[:n]  # no copy of a pure JSON body
    binary = memoryview(body)[n:]
    if header.count(b"[") + header.count(b"{") > MAX_JSON_CONTAINERS:
        raise InvalidRequest(
            f"malformed JSON header: over {MAX_JSON_CONTAINERS} lists and objects (nested too deeply "
            "or too widely): send tensor data flat, in row-major order"
        )
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
        tensor, offset = _input(item, i, header, binary, offset)
        if tensor.name in inputs:
            raise InvalidRequest(f"input {show(tensor.name)} is given twice")
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


def show(value: Any, limit: int = 64) -> str:
    """A client's value for an error message: a string quoted and cut to `limit` characters, any
    other value by its type (a message never grows with what the client sent)."""
    if not isinstance(value, str):
        return f"a JSON {type(value).__name__}"
    text = repr(value[:limit])
    return text if len(value) <= limit else f"{text[:-1]}…{text[-1]}"


def _shape(name: str, shape: Any) -> tuple[int, ...]:
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM for d in shape)
    ):
        raise InvalidRequest(
            f'input {show(name)}: "shape" must be a list of at most {MAX_DIMS} non-negative int64s'
        )
    return tuple(shape)


def _count(name: str, shape: tuple[int, ...], limit: int) -> int:
    """The elements `shape` declares; InvalidRequest once they pass `limit`, the most its data could
    hold (so the product stays small however large the dims)."""
    if 0 in shape:
        return 0
    count = 1
    for d in shape:
        count *= d
        if count > limit:
            raise InvalidRequest(
                f"input {show(name)}: shape {list(shape)} declares more elements than its "
                f"{limit} bytes of data can hold"
            )
    return count


def _input(item: Any, i: int, header: bytes, binary: memoryview, offset: int) -> tuple[InputTensor, int]:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise InvalidRequest(f'inputs[{i}] must be an object with a "name"')
    name, datatype = item["name"], item.get("datatype")
    if datatype not in DATATYPES:
        raise InvalidRequest(
            f"input {show(name)}: datatype {show(datatype)} is not one of {', '.join(DATATYPES)}"
        )
    shape = _shape(name, item.get("shape"))
    size = _parameters(item, f"input {show(name)}").get("binary_data_size")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidRequest(f"input {show(name)}: binary_data_size must be a non-negative integer")
        if offset + size > len(binary):
            raise InvalidRequest(
                f"input {show(name)}: binary_data_size runs past the binary section "
                f"({len(binary) - offset} bytes left)"
            )
        if "data" in item:
            raise InvalidRequest(f'input {show(name)}: give either "data" or binary_data_size, not both')
        count = _count(name, shape, size)  # every element takes a byte at least
        if datatype == "BYTES" and count * _LEN.size > size:
            raise InvalidRequest(
                f"input {show(name)}: {size} bytes cannot hold {count} BYTES elements (4 bytes of "
                "length each at least)"
            )
        if datatype != "BYTES" and size != count * NUMERIC[datatype].itemsize:
            raise InvalidRequest(
                f"input {show(name)}: {size} bytes of {datatype} for a shape of {count} elements "
                f"({count * NUMERIC[datatype].itemsize} bytes)"
            )
        tensor = InputTensor(name, datatype, shape, count, True, binary[offset : offset + size])
        return tensor, offset + size
    if "data" in item:
        count = _count(name, shape, len(header))  # every JSON value takes a byte at least
        return InputTensor(name, datatype, shape, count, False, item["data"]), offset
    raise InvalidRequest(f'input {show(name)} has neither "data" nor a binary_data_size parameter')


def _from_binary(name: str, datatype: str, count: int, chunk: memoryview) -> np.ndarray:
    if datatype == "BYTES":
        items, pos = [], 0
        while len(items) < count:  # never more than the shape declares
            if pos == len(chunk):
                raise InvalidRequest(
                    f"input {show(name)}: {len(items)} BYTES elements for a shape of {count}"
                )
            if pos + _LEN.size > len(chunk):
                raise InvalidRequest(f"input {show(name)}: a BYTES element's length prefix is cut short")
            (n,) = _LEN.unpack_from(chunk, pos)
            pos += _LEN.size
            if pos + n > len(chunk):
                raise InvalidRequest(f"input {show(name)}: a BYTES element runs past its binary data")
            items.append(bytes(chunk[pos : pos + n]))
            pos += n
        if pos != len(chunk):
            raise InvalidRequest(
                f"input {show(name)}: more BYTES elements than the shape's {count} (or bytes after them)"
            )
        out = np.empty(count, dtype=object)
        out[:] = items
        return out
    return np.frombuffer(chunk, dtype=NUMERIC[datatype])  # its size was checked against the shape


def _flatten(data: Any, limit: int) -> list[Any]:
    """The leaves of nested lists, in order, stopping after `limit` + 1 of them. Iterative: a deeply
    nested list must not overflow the stack."""
    out: list[Any] = []
    stack = [data]
    while stack and len(out) <= limit:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            out.append(item)
    return out


def _from_json(name: str, datatype: str, count: int, data: Any) -> np.ndarray:
    flat = _flatten(data, count)
    if len(flat) > count:
        raise InvalidRequest(f"input {show(name)}: more values than the shape's {count} elements")
    if len(flat) < count:
        raise InvalidRequest(f"input {show(name)}: {len(flat)} values for a shape of {count} elements")
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in flat):
            raise InvalidRequest(f"input {show(name)}: BYTES data in JSON must be strings")
        out = np.empty(len(flat), dtype=object)
        try:
            out[:] = [v.encode() for v in flat]
        except UnicodeEncodeError:  # a lone surrogate ("\ud800") is valid JSON, not valid UTF-8
            raise InvalidRequest(f"input {show(name)}: BYTES data must be valid Unicode text") from None
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
        raise InvalidRequest(f"input {show(name)}: data must be {datatype} values")
    try:
        with np.errstate(over="raise"):
            return np.asarray(flat, dtype=dtype)
    except (OverflowError, FloatingPointError):  # 10**400 as FP32, 1e300 as FP16
        raise InvalidRequest(f"input {show(name)}: a value is out of the range of {datatype}") from None


def _outputs(raw: Any, binary_default: bool) -> list[RequestedOutput]:
    if not isinstance(raw, list):
        raise InvalidRequest('"outputs" must be a list')
    out: list[RequestedOutput] = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidRequest(f'outputs[{i}] must be an object with a "name"')
        where = f"output {show(item['name'])}"
        binary = _parameters(item, where).get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise InvalidRequest(f"{where}: binary_data must be a boolean")
        if any(o.name == item["name"] for o in out):
            raise InvalidRequest(f"{where} is asked for twice")
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
