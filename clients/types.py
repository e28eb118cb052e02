"""Typed results of the SDK (pydantic), mirroring the server's JSON. A comment per field."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")  # newer servers may add fields


class Prediction(_Model):
    label: str  # class name from the task artifact
    index: int  # class index in the task's head
    score: float  # softmax probability


class Timings(_Model):
    decode_ms: float  # decoding and preprocessing the images
    queue_ms: float  # waiting for a batch
    compute_ms: float  # the batch's forward pass
    total_ms: float  # server-side time for the request
    batch_size: int  # images in the forward pass this request rode in


class ClassifyResult(_Model):
    task_id: str
    version: int  # task version every image ran on
    predictions: list[list[Prediction]]  # top-k per image, best first
    timings: Timings


class EmbedResult(_Model):
    task_id: str
    version: int
    features: list[list[float]]  # final-norm CLS feature per image
    timings: Timings


class VersionInfo(_Model):
    version: int
    sha256: str  # of the artifact bytes
    size: int  # artifact bytes
    created: float  # Unix time


class TaskUsage(_Model):
    requests: int  # served by the replica that answered
    images: int
    errors: int
    last_used: float | None


class TaskInfo(_Model):
    task_id: str
    tenant: str
    version: int  # current version
    mode: str  # "shallow" | "deep"
    prompt_length: int  # P (0 = linear probe)
    num_classes: int
    labels: list[str]
    backbone: str
    backbone_fingerprint: str
    name: str | None = None
    description: str | None = None
    size: int
    created: float
    versions: list[VersionInfo]  # retained versions, oldest first
    resident_versions: list[int] = []  # versions in the answering replica's bank
    usage: TaskUsage | None = None


class TaskList(_Model):
    tasks: list[TaskInfo]
    next_cursor: str | None  # pass to tasks(cursor=...) for the next page


class BackboneInfo(_Model):
    backbone_id: str
    spec: str
    fingerprint: str
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    image_size: int
    resize_size: int
    mean: list[float]
    std: list[float]
    device: str
    dtype: str


class ServerInfo(_Model):
    backbone: BackboneInfo
    limits: dict[str, float]
    bank: dict[str, int]
    batching: str
    version: str
