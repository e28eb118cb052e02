"""server.api.v2_tensors: Open Inference Protocol requests and responses, JSON and binary, checked
against tritonclient's own encoder and decoder where it has one."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from server.api.v2_tensors import OutputTensor, encode_response, parse_request
from server.errors import InvalidRequest

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
    np.testing.assert_array_equal(req.inputs["pixels"].value, pixels)
    assert list(req.inputs["images"].value) == [b"\x89PNG\x00\xff", b""]
    assert [(o.name, o.binary) for o in req.outputs] == [("scores", False)]
    assert req.parameters["top_k"] == 3


def test_json_inputs_and_the_binary_default():
    a = httpclient.InferInput("pixels", [1, 2, 2, 3], "UINT8")
    a.set_data_from_numpy(np.full((1, 2, 2, 3), 7, np.uint8), binary_data=False)
    b = httpclient.InferInput("images", [1], "BYTES")
    b.set_data_from_numpy(np.array(["aGk="], dtype=np.object_), binary_data=False)
    req = parse_request(*triton_body([a, b]))  # no outputs named: binary_data_output is set
    assert req.outputs is None and req.binary_outputs is True
    assert req.inputs["pixels"].value.dtype == np.uint8 and not req.inputs["pixels"].binary
    assert int(req.inputs["pixels"].value.sum()) == 7 * 12
    assert list(req.inputs["images"].value) == [b"aGk="]


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
    ],
)
def test_malformed_requests_are_400s_that_say_why(body, header, words):
    with pytest.raises(InvalidRequest, match=words):
        parse_request(body, header)


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
    wrong = {**x, "shape": [5], "parameters": {"binary_data_size": 4}}
    with pytest.raises(InvalidRequest, match="4 bytes of UINT8 for a shape of 5"):
        parse_request(*binary_request([wrong], b"abcd"))
    s = {"name": "s", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 6}}
    with pytest.raises(InvalidRequest, match="runs past"):
        parse_request(*binary_request([s], struct.pack("<I", 9) + b"ab"))
    with pytest.raises(InvalidRequest, match="2 BYTES elements for a shape of 1"):
        parse_request(*binary_request([{**s, "parameters": {"binary_data_size": 8}}], b"\0" * 8))


def test_a_deeply_nested_json_data_list_does_not_overflow():
    data = "[" * 100_000 + "1" + "]" * 100_000
    body = f'{{"inputs": [{{"name": "x", "datatype": "UINT8", "shape": [1], "data": {data}}}]}}'
    with pytest.raises(InvalidRequest, match="nested too deeply"):
        parse_request(body.encode(), None)


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
