"""server.api.v2_tensors: Open Inference Protocol requests and responses, JSON and binary, checked
against tritonclient's own encoder and decoder where it has one."""

from __future__ import annotations

import json
import struct
import time
import tracemalloc

import numpy as np
import pytest

from server.api.v2_tensors import MAX_HEADER_BYTES, InferRequest, OutputTensor, encode_response, parse_request
from server.errors import InvalidRequest, PayloadTooLarge

httpclient = pytest.importorskip("tritonclient.http")


def triton_body(inputs, outputs=None, parameters=None) -> tuple[bytes, str | None]:
    """The body and Inference-Header-Content-Length tritonclient sends for these inputs."""
    body, json_size = httpclient.InferenceServerClient.generate_request_body(
        inputs, outputs=outputs, parameters=parameters
    )
    return body, None if json_size is None else str(json_size)


def test_binary_inputs_as_tritonclient_sends_them():
    pixels = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    images = np.array([b"\x89PNG\x00\xff", b""], dtype=np.object_)
    a = httpclient.InferInput("pixels", list(pixels.shape), "UINT8")
    a.set_data_from_numpy(pixels, binary_data=True)
    b = httpclient.InferInput("images", [2], "BYTES")
    b.set_data_from_numpy(images, binary_data=True)
    out = [httpclient.InferRequestedOutput("scores", binary_data=False)]
    req = parse_request(*triton_body([a, b], out, {"top_k": 3}))
    assert req.inputs["pixels"].binary and req.inputs["pixels"].shape == (2, 3, 4, 3)
    np.testing.assert_array_equal(req.inputs["pixels"].decode(), pixels)
    assert list(req.inputs["images"].decode()) == [b"\x89PNG\x00\xff", b""]
    assert [(o.name, o.binary) for o in req.outputs] == [("scores", False)]
    assert req.parameters["top_k"] == 3


def parse_and_decode(body: bytes, header: str | None) -> InferRequest:
    req = parse_request(body, header)
    for tensor in req.inputs.values():
        tensor.decode()
    return req


def json_input(datatype: str, shape: object, data: str) -> bytes:
    return f'{{"inputs": [{{"name": "x", "datatype": "{datatype}", "shape": {shape}, "data": {data}}}]}}'.encode()


def test_json_inputs_and_the_binary_default():
    a = httpclient.InferInput("pixels", [1, 2, 2, 3], "UINT8")
    a.set_data_from_numpy(np.full((1, 2, 2, 3), 7, np.uint8), binary_data=False)
    b = httpclient.InferInput("images", [1], "BYTES")
    b.set_data_from_numpy(np.array(["aGk="], dtype=np.object_), binary_data=False)
    req = parse_request(*triton_body([a, b]))  # no outputs named: binary_data_output is set
    assert req.outputs is None and req.binary_outputs is True
    assert req.inputs["pixels"].decode().dtype == np.uint8 and not req.inputs["pixels"].binary
    assert int(req.inputs["pixels"].decode().sum()) == 7 * 12
    assert list(req.inputs["images"].decode()) == [b"aGk="]


@pytest.mark.parametrize(
    "body, header, words",
    [
        (b"{", None, "malformed JSON"),
        (b"[]", None, "JSON object"),
        (b'{"inputs": []}', None, "non-empty"),
        (b'{"inputs": [{"name": "x", "datatype": "FP99", "shape": [1], "data": [1]}]}', None, "FP99"),
        (b'{"inputs": [{"name": "x", "datatype": "UINT8", "shape": [-1], "data": [1]}]}', None, "shape"),
        (b'{"inputs": [{"name": "x", "datatype": "UINT8", "shape": [2], "data": [1]}]}', None, "1 values"),
        (b'{"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1], "data": [256]}]}', None, "UINT8"),
        (b'{"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1], "data": [true]}]}', None, "UINT8"),
        (b'{"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": [1]}]}', None, "strings"),
        (b'{"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1]}]}', None, "neither"),
        (
            b'{"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1], "data": [1]},'
            b'{"name": "x", "datatype": "UINT8", "shape": [1], "data": [1]}]}',
            None,
            "twice",
        ),
        (b'{"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1], "data": [1]}]}', "abc", "integer"),
        (b'{"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1], "data": [1]}]}', "999", "outside"),
        # Values Python parses but the datatype cannot hold, or UTF-8 cannot encode.
        (json_input("FP32", [1], f"[{10**400}]"), None, "out of the range of FP32"),
        (json_input("FP16", [1], "[1e300]"), None, "out of the range of FP16"),
        (json_input("BYTES", [1], '["\\ud800"]'), None, "valid Unicode"),
        # Shapes whose element count would be a bignum (its message once could not even be formatted).
        (json_input("UINT8", [10**2000] * 3, "[0]"), None, "int64"),
        (json_input("UINT8", [2**62] * 3, "[0]"), None, "more elements than its"),
        (json_input("UINT8", [1] * 9, "[0]"), None, "at most 8"),
        (json_input("UINT8", [2], "[1, 2, 3]"), None, "more values than the shape's 2"),
        # A client's strings are cut short in messages.
        (json_input("X" * 100_000, [1], "[0]"), None, "XXX…'"),
    ],
)
def test_malformed_requests_are_400s_that_say_why(body, header, words):
    with pytest.raises(InvalidRequest, match=words) as info:
        parse_and_decode(body, header)
    assert len(info.value.message) < 300


def binary_request(inputs: list[dict], binary: bytes) -> tuple[bytes, str]:
    head = json.dumps({"inputs": inputs}).encode()
    return head + binary, str(len(head))


def test_binary_sections_must_add_up():
    x = {"name": "x", "datatype": "UINT8", "shape": [4], "parameters": {"binary_data_size": 4}}
    parse_request(*binary_request([x], b"abcd"))
    with pytest.raises(InvalidRequest, match="runs past"):
        parse_request(*binary_request([x], b"abc"))
    with pytest.raises(InvalidRequest, match="add up"):
        parse_request(*binary_request([x], b"abcde"))
    wrong = {**x, "shape": [3], "parameters": {"binary_data_size": 4}}
    with pytest.raises(InvalidRequest, match="4 bytes of UINT8 for a shape of 3"):
        parse_request(*binary_request([wrong], b"abcd"))
    s = {"name": "s", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 6}}
    with pytest.raises(InvalidRequest, match="runs past"):
        parse_and_decode(*binary_request([s], struct.pack("<I", 9) + b"ab"))
    with pytest.raises(InvalidRequest, match="more BYTES elements than the shape's 1"):
        parse_and_decode(*binary_request([{**s, "parameters": {"binary_data_size": 8}}], b"\0" * 8))
    two = {**s, "shape": [2], "parameters": {"binary_data_size": 8}}
    with pytest.raises(InvalidRequest, match="1 BYTES elements for a shape of 2"):
        parse_and_decode(*binary_request([two], struct.pack("<I", 4) + b"abcd"))
    with pytest.raises(InvalidRequest, match="cannot hold 3 BYTES elements"):
        parse_request(*binary_request([{**two, "shape": [3]}], b"\0" * 8))


@pytest.mark.parametrize("depth", [5_000, 100_000])
def test_a_deeply_nested_json_data_list_does_not_overflow(depth):
    data = "[" * depth + "1" + "]" * depth
    with pytest.raises(InvalidRequest, match="nested too deeply"):
        parse_request(json_input("UINT8", [1], data), None)


# Sizes a client chooses cost no work in proportion before they are checked: each of these was
# seconds of CPU on the event loop (and the JSON one ~27x its size in memory). The bound is generous
# (a shared, busy CI box); refused as it is now, each takes milliseconds.
FAST_S = 2.0


def refused_fast(
    body: bytes, header: str | None, error: type[Exception], words: str, max_alloc: int | None = None
) -> None:
    """Refused within FAST_S, and allocating at most `max_alloc` bytes meanwhile when given."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(error, match=words):
            parse_and_decode(body, header)
        elapsed, (_, peak) = time.perf_counter() - t0, tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < FAST_S
    if max_alloc is not None:
        assert peak < max_alloc, f"{peak} bytes allocated"


def test_huge_dims_are_refused_before_any_product():
    # 40,000 dims of 10**18: their product alone took seconds (quadratic in the number of dims).
    refused_fast(json_input("UINT8", [10**18] * 40_000, "[0]"), None, InvalidRequest, "at most 8")
    # Few, huge dims: the product stops once it passes what the data could hold.
    refused_fast(json_input("UINT8", [2**63 - 1] * 8, "[0]"), None, InvalidRequest, "can hold")


def test_wide_nested_json_data_is_refused_before_parsing():
    data = "[" + ",".join(["[0]"] * 1_000_000) + "]"  # 4 MB of lists of one value
    refused_fast(json_input("UINT8", [1_000_000, 1], data), None, InvalidRequest, "too widely", 64 * 1024)


def test_the_json_header_has_its_own_limit():
    flat = json_input("UINT8", [3_000_000], "[" + ",".join(["0"] * 3_000_000) + "]")  # 6 MB of JSON
    assert len(flat) > MAX_HEADER_BYTES
    refused_fast(flat, None, PayloadTooLarge, "over the limit", 64 * 1024)
    # Binary data does not count; the header length it gives does, before the header is read.
    x = {
        "name": "x",
        "datatype": "UINT8",
        "shape": [6_000_000],
        "parameters": {"binary_data_size": 6_000_000},
    }
    parse_request(*binary_request([x], bytes(6_000_000)))
    refused_fast(bytes(6_000_000), str(MAX_HEADER_BYTES + 1), PayloadTooLarge, "over the limit")


def test_many_small_bytes_elements_are_read_no_further_than_the_shape():
    elements = b"".join(struct.pack("<I", 2) + b"ab" for _ in range(1_000_000))
    s = {"name": "s", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(elements)}}
    body, header = binary_request([s], elements)
    refused_fast(body, header, InvalidRequest, "more BYTES elements than the shape's 1", 64 * 1024)


def read_with_tritonclient(body: bytes, header_length: int | None):
    return httpclient.InferResult.from_response_body(body, header_length=header_length)


@pytest.mark.parametrize("binary", [True, False])
def test_responses_read_back_with_tritonclient(binary):
    scores = np.random.default_rng(0).random((2, 5), dtype=np.float32)
    idx = np.array([[4, 1], [0, 3]], dtype=np.int64)
    labels = np.array([["cat", "dög"], ["a", ""]], dtype=object)
    outputs = [
        OutputTensor("scores", "FP32", scores, binary),
        OutputTensor("top_indices", "INT64", idx, binary),
        OutputTensor("top_labels", "BYTES", labels, binary),
    ]
    body, header_length = encode_response({"model_name": "m", "model_version": "3", "id": "r1"}, outputs)
    assert (header_length is not None) == binary
    result = read_with_tritonclient(body, header_length)
    assert result.get_response()["model_version"] == "3" and result.get_response()["id"] == "r1"
    np.testing.assert_array_equal(result.as_numpy("scores"), scores)
    np.testing.assert_array_equal(result.as_numpy("top_indices"), idx)
    got = result.as_numpy("top_labels")
    assert got.shape == (2, 2)
    assert [x.decode() if isinstance(x, bytes) else x for x in got.reshape(-1)] == ["cat", "dög", "a", ""]
