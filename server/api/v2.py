"""The Open Inference Protocol (KServe v2 REST, as Triton speaks it) over the same scheduler as /v1.

A task of the caller's tenant is a model; its current version is the model version, the only one
served (the scheduler runs a task's current version: it cannot pin an older one). Inputs: encoded
images (`images`, BYTES [N]) or raw RGB pixels (`pixels`, UINT8 [N,H,W,3]); outputs: softmax `scores`,
the top-k `top_indices` / `top_labels` / `top_scores`, and the CLS `embedding`. Names, shapes and
parameters: docs/api.md, "Open Inference Protocol". Tensor coding lives in `server.api.v2_tensors`;
admission, decoding, submission and stats are /v1's (`inference.run_images`).

References: kserve/open-inference-protocol (`rest_predict_v2.yaml`), Triton's
`docs/protocol/extension_binary_data.md` and `extension_model_configuration.md`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field

import server
from prompt_store.base import TaskInfo
from server.api.bodies import decode_base64_image, read_body
from server.api.common import ERRORS
from server.api.deps import Principal, PrincipalDep, ServicesDep, TaskId
from server.api.inference import Images, run_images
from server.api.v2_tensors import (
    InferRequest,
    OutputTensor,
    RequestedOutput,
    encode_response,
    parse_request,
    show,
)
from server.engine.batch import Output
from server.errors import InvalidImage, InvalidRequest, TaskNotFound, Unavailable
from server.scheduler.scheduler import DEFAULT_TOP_K
from server.scheduler.types import Result
from server.services import Services

router = APIRouter(prefix="/v2", tags=["open inference protocol"])

EXTENSIONS = ["binary_tensor_data", "model_configuration"]


@dataclass(frozen=True)
class OutputSpec:
    datatype: str  # the protocol's datatype
    config_type: str  # the model configuration's data_type
    kind: Output  # the scheduler submission that computes it


OUTPUTS = {
    "scores": OutputSpec("FP32", "TYPE_FP32", "classify"),  # [N, C] softmax over the task's classes
    "top_indices": OutputSpec("INT64", "TYPE_INT64", "classify"),  # [N, k] class indices, best first
    "top_labels": OutputSpec("BYTES", "TYPE_STRING", "classify"),  # [N, k] their labels
    "top_scores": OutputSpec("FP32", "TYPE_FP32", "classify"),  # [N, k] their scores
    "embedding": OutputSpec("FP32", "TYPE_FP32", "embed"),  # [N, D] final-norm CLS feature
}
INPUTS = ("images", "pixels")  # exactly one per request


class V2Error(BaseModel):
    """The protocol's error body."""

    error: str = Field(description="What went wrong")


# /v1's status codes, in the protocol's error shape.
V2_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": V2Error, "description": doc["description"]} for code, doc in ERRORS.items()
}
EMPTY_OK: dict[int | str, dict[str, Any]] = {200: {"description": "Yes (an empty body)", "content": None}}
INFER_OK: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The inference response: JSON, or JSON followed by binary tensor data (its "
        "length in Inference-Header-Content-Length)",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
INFER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "A JSON inference request, followed by binary tensor data when the header "
        "Inference-Header-Content-Length gives the JSON part's length",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


# --- server ---------------------------------------------------------------------------------------


@router.get("", summary="Server metadata", responses=V2_ERRORS)
async def server_metadata(_: PrincipalDep) -> dict[str, Any]:
    return {"name": "vpt-serve", "version": server.__version__, "extensions": EXTENSIONS}


@router.get(
    "/health/live",
    summary="Liveness (public, like /healthz)",
    response_class=Response,
    responses={**EMPTY_OK, 503: V2_ERRORS[503]},
)
async def live(request: Request) -> Response:
    services: Services | None = getattr(request.app.state, "services", None)
    if services is not None and not services.core.alive:
        raise Unavailable("the engine process exited: restart the server")
    return Response(status_code=200)


@router.get(
    "/health/ready",
    summary="Readiness (public, like /readyz)",
    response_class=Response,
    responses={**EMPTY_OK, 503: V2_ERRORS[503]},
)
async def ready(request: Request) -> Response:
    services: Services | None = getattr(request.app.state, "services", None)
    if services is None or not services.ready:
        raise Unavailable(services.not_ready_reason if services is not None else "starting")
    return Response(status_code=200)


# --- models ---------------------------------------------------------------------------------------


async def _model(services: Services, principal: Principal, task_id: str, version: str | None) -> TaskInfo:
    """The task as a model; TaskNotFound (404) for another tenant's task, like an unknown one, and
    for any version but the current one."""
    info = await asyncio.to_thread(services.store.info, principal.tenant, task_id)
    if version is not None and version != str(info.current.version):
        raise TaskNotFound(
            f"model {task_id!r} version {version!r} is not served: only its current version, "
            f"{info.current.version}, is"
        )
    return info


def _metadata(services: Services, info: TaskInfo) -> dict[str, Any]:
    C, D = info.metadata.num_classes, services.core.info.cfg.embed_dim
    shapes = {"scores": [-1, C], "top_indices": [-1, -1], "top_labels": [-1, -1], "top_scores": [-1, -1]}
    return {
        "name": info.task_id,
        "versions": [str(info.current.version)],
        "platform": "vpt",
        "inputs": [
            {"name": "images", "datatype": "BYTES", "shape": [-1]},
            {"name": "pixels", "datatype": "UINT8", "shape": [-1, -1, -1, 3]},
        ],
        "outputs": [
            {"name": name, "datatype": spec.datatype, "shape": shapes.get(name, [-1, D])}
            for name, spec in OUTPUTS.items()
        ],
    }


def _config(services: Services, info: TaskInfo) -> dict[str, Any]:
    """Triton's model configuration, as far as clients read it (perf_analyzer: max_batch_size, the
    inputs and outputs). With max_batch_size > 0, dims leave out the batch dimension."""
    s = services.settings
    C, D = info.metadata.num_classes, services.core.info.cfg.embed_dim
    dims = {"scores": [C], "embedding": [D]}
    return {
        "name": info.task_id,
        "platform": "vpt",
        "backend": "vpt",
        "version_policy": {"specific": {"versions": [info.current.version]}},
        "max_batch_size": min(s.max_images_per_request, s.max_batch_size),
        "input": [
            # One encoded image per batch element: [N] on the wire, [N, 1] also accepted.
            {
                "name": "images",
                "data_type": "TYPE_STRING",
                "dims": [1],
                "reshape": {"shape": []},
                "optional": True,
            },
            {"name": "pixels", "data_type": "TYPE_UINT8", "dims": [-1, -1, 3], "optional": True},
        ],
        "output": [
            {"name": name, "data_type": spec.config_type, "dims": dims.get(name, [-1])}
            for name, spec in OUTPUTS.items()
        ],
        "parameters": {"top_k": {"string_value": str(DEFAULT_TOP_K)}},
    }


Handler = Callable[[Request, Services, Principal, str, str | None], Awaitable[Any]]


def _model_route(method: str, suffix: str, summary: str, handler: Handler, **kw: Any) -> None:
    """`/models/{task_id}<suffix>` and `/models/{task_id}/versions/{version}<suffix>`, both served by
    `handler(request, services, principal, task_id, version or None)`."""

    async def current(
        task_id: TaskId, request: Request, services: ServicesDep, principal: PrincipalDep
    ) -> Any:
        return await handler(request, services, principal, task_id, None)

    async def versioned(
        task_id: TaskId, version: str, request: Request, services: ServicesDep, principal: PrincipalDep
    ) -> Any:
        return await handler(request, services, principal, task_id, version)

    name = summary.lower().replace(" ", "_").replace("'", "")
    current.__name__, versioned.__name__ = name, f"{name}_of_a_version"
    router.add_api_route(f"/models/{{task_id}}{suffix}", current, methods=[method], summary=summary, **kw)
    router.add_api_route(
        f"/models/{{task_id}}/versions/{{version}}{suffix}",
        versioned,
        methods=[method],
        summary=f"{summary} of a version",
        **kw,
    )


async def _get_metadata(
    _: Request, services: Services, principal: Principal, task_id: str, version: str | None
) -> dict[str, Any]:
    return _metadata(services, await _model(services, principal, task_id, version))


async def _get_ready(
    _: Request, services: Services, principal: Principal, task_id: str, version: str | None
) -> Response:
    await _model(services, principal, task_id, version)
    if not services.ready:
        raise Unavailable(services.not_ready_reason)
    return Response(status_code=200)


async def _get_config(
    _: Request, services: Services, principal: Principal, task_id: str, version: str | None
) -> dict[str, Any]:
    return _config(services, await _model(services, principal, task_id, version))


async def _infer(
    request: Request, services: Services, principal: Principal, task_id: str, version: str | None
) -> Response:
    s = services.settings
    started = time.perf_counter()
    body = await read_body(request, s.max_body_bytes)
    req = parse_request(body, request.headers.get("inference-header-content-length"))
    images = _images(req, services)
    wanted = _wanted(req)
    top_k = _top_k(req, s.max_top_k)
    kinds: tuple[Output, ...] = tuple(dict.fromkeys(OUTPUTS[o.name].kind for o in wanted))
    if version is not None:
        await _model(services, principal, task_id, version)
    # `scores` needs every class: a top-k over all of them (the engine caps k at each task's C).
    k = s.max_classes if any(o.name == "scores" for o in wanted) else top_k
    results, _ = await run_images(
        request, services, principal, task_id, images, kinds, top_k=k, route="v2_infer", started=started
    )
    if len({r.version for r in results}) > 1:  # an upload landed between the two submissions
        raise Unavailable("the model's version changed during the request: retry it")
    served = results[0].version
    if version is not None and str(served) != version:
        raise TaskNotFound(
            f"model {task_id!r} version {version!r} was replaced by version {served} meanwhile"
        )
    by_kind = dict(zip(kinds, results, strict=True))
    outputs = [
        OutputTensor(o.name, OUTPUTS[o.name].datatype, _output(o.name, by_kind, top_k), o.binary)
        for o in wanted
    ]
    header: dict[str, Any] = {"model_name": task_id, "model_version": str(served)}
    if req.id is not None:
        header["id"] = req.id
    content, header_length = encode_response(header, outputs)
    if header_length is None:
        return Response(content, media_type="application/json")
    return Response(
        content,
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(header_length)},
    )


_model_route("GET", "", "Model metadata", _get_metadata, responses=V2_ERRORS)
_model_route(
    "GET",
    "/ready",
    "Model readiness",
    _get_ready,
    response_class=Response,
    responses={**EMPTY_OK, **V2_ERRORS},
)
_model_route("GET", "/config", "Model configuration", _get_config, responses=V2_ERRORS)
_model_route(
    "POST",
    "/infer",
    "Inference",
    _infer,
    openapi_extra=INFER_BODY,
    response_class=Response,
    responses={**INFER_OK, **V2_ERRORS},
)


def _images(req: InferRequest, services: Services) -> Images:
    """The request's one image input, its declared shape checked against the model's inputs and the
    server's limits before its data is decoded, as the shared inference path takes it."""
    unknown = set(req.inputs) - set(INPUTS)
    if unknown:
        raise InvalidRequest(
            f"unknown input {show(sorted(unknown)[0])}: the model's inputs are 'images' (BYTES [N]) and "
            "'pixels' (UINT8 [N,H,W,3])"
        )
    if len(req.inputs) != 1:
        raise InvalidRequest("give exactly one input: 'images' (BYTES [N]) or 'pixels' (UINT8 [N,H,W,3])")
    ((name, tensor),) = req.inputs.items()
    limit = services.settings.max_images_per_request
    n = tensor.shape[0] if tensor.shape else 0
    if name == "images":
        if tensor.datatype != "BYTES":
            raise InvalidRequest(f"input 'images' must be BYTES (encoded images), not {tensor.datatype}")
        if tensor.shape not in ((n,), (n, 1)):
            raise InvalidRequest(f"input 'images' must have shape [N] or [N, 1], not {list(tensor.shape)}")
    else:
        if tensor.datatype != "UINT8":
            raise InvalidRequest(f"input 'pixels' must be UINT8, not {tensor.datatype}")
        if len(tensor.shape) != 4 or tensor.shape[3] != 3:
            raise InvalidRequest(
                f"input 'pixels' must have shape [N, H, W, 3] (RGB), not {list(tensor.shape)}"
            )
    if not 1 <= n <= limit:
        raise InvalidRequest(f"{n} images: a request carries 1 to {limit}")
    if name == "pixels":
        h, w, max_pixels = tensor.shape[1], tensor.shape[2], services.settings.max_image_pixels
        if h * w > max_pixels:  # as `preprocess.pixels` says it, before the data is read
            raise InvalidImage(f"images are {w}x{h} pixels, over the limit of {max_pixels}")
        pixels = tensor.decode()
        return Images(n, lambda: services.preprocess.pixels(pixels))
    blobs = [bytes(b) for b in tensor.decode().reshape(-1)]
    if not tensor.binary:  # JSON carries text: images in JSON `data` are base64, as in /v1's JSON body
        blobs = [decode_base64_image(b, i) for i, b in enumerate(blobs)]
    return Images(n, lambda: services.preprocess(blobs))


def _wanted(req: InferRequest) -> list[RequestedOutput]:
    if req.outputs is None:
        return [RequestedOutput(name, req.binary_outputs) for name in OUTPUTS]
    if not req.outputs:
        raise InvalidRequest('"outputs" is empty: leave it out for every output')
    for o in req.outputs:
        if o.name not in OUTPUTS:
            raise InvalidRequest(
                f"unknown output {show(o.name)}: the model's outputs are {', '.join(OUTPUTS)}"
            )
    return req.outputs


def _top_k(req: InferRequest, limit: int) -> int:
    k = req.parameters.get("top_k", DEFAULT_TOP_K)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidRequest('parameter "top_k" must be a positive integer')
    if k > limit:
        raise InvalidRequest(f"top_k exceeds the limit of {limit}")
    return k


def _output(name: str, by_kind: dict[Output, Result], top_k: int) -> np.ndarray:
    """One output tensor from the scheduler's results."""
    if name == "embedding":
        feats = by_kind["embed"].features
        assert feats is not None
        return np.asarray(feats, dtype=np.float32)  # (N, D)
    rows = by_kind["classify"].predictions
    assert rows is not None
    if name == "scores":  # every class came back, best first: put them in class order
        out = np.zeros((len(rows), len(rows[0])), dtype=np.float32)  # (N, C)
        for r, row in enumerate(rows):
            out[r, [p.index for p in row]] = [p.score for p in row]
        return out
    top = [row[:top_k] for row in rows]
    if name == "top_indices":
        return np.asarray([[p.index for p in row] for row in top], dtype=np.int64)  # (N, k)
    if name == "top_scores":
        return np.asarray([[p.score for p in row] for row in top], dtype=np.float32)  # (N, k)
    out = np.empty((len(top), len(top[0])), dtype=object)  # (N, k) labels
    out[:] = [[p.label for p in row] for row in top]
    return out
