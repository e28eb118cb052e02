"""Response and request bodies of the REST API (pydantic). A comment per field; the client mirrors them."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    type: str = Field(description="Stable error type, e.g. not_found, invalid_image, overloaded")
    message: str = Field(description="Human-readable reason naming the offending field or input")


class ErrorResponse(BaseModel):
    error: ErrorBody

    model_config = {
        "json_schema_extra": {
            "examples": [{"error": {"type": "not_found", "message": "task 'birds' not found"}}]
        }
    }


class Prediction(BaseModel):
    label: str = Field(description="Class name from the task artifact")
    index: int = Field(description="Class index in the task's head")
    score: float = Field(description="Softmax probability")


class Timings(BaseModel):
    decode_ms: float = Field(description="Decoding and preprocessing the images")
    queue_ms: float = Field(description="Waiting for a batch")
    compute_ms: float = Field(description="The batch's forward pass")
    total_ms: float = Field(description="Server-side time for the whole request")
    batch_size: int = Field(description="Images in the forward pass this request rode in")


TIMINGS_EXAMPLE = {"decode_ms": 2.1, "queue_ms": 0.4, "compute_ms": 5.3, "total_ms": 8.0, "batch_size": 12}


class ClassifyResponse(BaseModel):
    task_id: str
    version: int = Field(description="Task version every image of this request ran on")
    predictions: list[list[Prediction]] = Field(description="Top-k per image, best first")
    timings: Timings

    model_config = {
        "json_schema_extra": {
            "examples": [
                {
                    "task_id": "birds",
                    "version": 3,
                    "predictions": [[{"label": "sparrow", "index": 4, "score": 0.91}]],
                    "timings": TIMINGS_EXAMPLE,
                }
            ]
        }
    }


class EmbedResponse(BaseModel):
    task_id: str
    version: int = Field(description="Task version (its prompts shape the features)")
    features: list[list[float]] = Field(description="Final-norm CLS feature per image (D floats)")
    timings: Timings

    model_config = {
        "json_schema_extra": {
            "examples": [
                {
                    "task_id": "birds",
                    "version": 3,
                    "features": [[0.12, -1.3, 0.57]],
                    "timings": TIMINGS_EXAMPLE,
                }
            ]
        }
    }


class ClassifyJSON(BaseModel):
    """JSON form of a classify/embed request."""

    images: list[str] = Field(description="Base64-encoded image files (JPEG, PNG, WebP, GIF, BMP)")
    top_k: int | None = Field(None, ge=1, description="Labels per image (classify only)")

    model_config = {"json_schema_extra": {"examples": [{"images": ["/9j/4AAQSkZJRg..."], "top_k": 5}]}}


class VersionOut(BaseModel):
    version: int
    sha256: str = Field(description="SHA-256 of the artifact bytes")
    size: int = Field(description="Artifact size in bytes")
    created: float = Field(description="Unix time the version was committed")


class TaskUsage(BaseModel):
    """Counted on this replica only for requests made while it knew the task to exist (a request for a
    missing id leaves nothing behind), so a task created under an id requested earlier starts at zero."""

    requests: int = Field(description="Requests served by this replica since it started")
    images: int = Field(description="Images classified or embedded by this replica")
    errors: int = Field(description="Requests that failed on this replica")
    last_used: float | None = Field(description="Unix time of the last request")


TASK_EXAMPLE = {
    "task_id": "birds",
    "tenant": "acme",
    "version": 3,
    "mode": "deep",
    "prompt_length": 50,
    "num_classes": 3,
    "labels": ["sparrow", "finch", "robin"],
    "backbone": "google/vit-base-patch16-224-in21k",
    "backbone_fingerprint": "v1:cd351a4e56270d2b50e6942be0...",
    "name": "Garden birds",
    "description": None,
    "size": 1077432,
    "created": 1795939200.0,
    "versions": [
        {"version": 2, "sha256": "9f86d08188...", "size": 1077432, "created": 1795852800.0},
        {"version": 3, "sha256": "60303ae22b...", "size": 1077432, "created": 1795939200.0},
    ],
    "resident_versions": [3],
    "usage": {"requests": 1200, "images": 4100, "errors": 2, "last_used": 1795940000.0},
}


class TaskOut(BaseModel):
    task_id: str
    tenant: str
    version: int = Field(description="Current version")
    mode: str = Field(description="shallow or deep (VPT)")
    prompt_length: int = Field(description="Prompt tokens P (0 = linear probe)")
    num_classes: int
    labels: list[str]
    backbone: str = Field(description="Backbone id the task was trained on")
    backbone_fingerprint: str
    name: str | None = None
    description: str | None = None
    size: int = Field(description="Artifact bytes of the current version")
    created: float = Field(description="Unix time the current version was committed")
    versions: list[VersionOut] = Field(description="Retained versions, oldest first")
    resident_versions: list[int] = Field(default_factory=list, description="Versions in this replica's bank")
    usage: TaskUsage | None = None

    model_config = {"json_schema_extra": {"examples": [TASK_EXAMPLE]}}


class TaskList(BaseModel):
    tasks: list[TaskOut]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page; null at the end")

    model_config = {"json_schema_extra": {"examples": [{"tasks": [TASK_EXAMPLE], "next_cursor": "birds"}]}}


class RollbackRequest(BaseModel):
    version: int = Field(ge=1, description="Retained version to make current")

    model_config = {"json_schema_extra": {"examples": [{"version": 2}]}}


class BackboneInfo(BaseModel):
    backbone_id: str
    spec: str
    fingerprint: str
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    image_size: int
    resize_size: int = Field(description="Shorter side is resized to this, then centre-cropped")
    mean: list[float]
    std: list[float]
    device: str
    dtype: str


class Limits(BaseModel):
    max_batch_size: int
    max_images_per_request: int
    max_image_bytes: int
    max_image_pixels: int
    max_body_bytes: int
    max_artifact_bytes: int
    max_prompt_length: int
    max_classes: int
    max_top_k: int
    request_timeout_s: float


class BankInfo(BaseModel):
    capacity: int
    resident: int
    allocated_bytes: int
    used_bytes: int


class InfoResponse(BaseModel):
    backbone: BackboneInfo
    limits: Limits
    bank: BankInfo
    batching: str
    version: str = Field(description="Server version")

    model_config = {
        "json_schema_extra": {
            "examples": [
                {
                    "backbone": {
                        "backbone_id": "google/vit-base-patch16-224-in21k",
                        "spec": "hf-hub:google/vit-base-patch16-224-in21k",
                        "fingerprint": "v1:cd351a4e56270d2b50e6942be0...",
                        "embed_dim": 768,
                        "depth": 12,
                        "num_heads": 12,
                        "patch_size": 16,
                        "image_size": 224,
                        "resize_size": 256,
                        "mean": [0.5, 0.5, 0.5],
                        "std": [0.5, 0.5, 0.5],
                        "device": "cuda:0",
                        "dtype": "bfloat16",
                    },
                    "limits": {
                        "max_batch_size": 64,
                        "max_images_per_request": 64,
                        "max_image_bytes": 20971520,
                        "max_image_pixels": 40000000,
                        "max_body_bytes": 104857600,
                        "max_artifact_bytes": 67108864,
                        "max_prompt_length": 100,
                        "max_classes": 1000,
                        "max_top_k": 100,
                        "request_timeout_s": 30.0,
                    },
                    "bank": {
                        "capacity": 1024,
                        "resident": 310,
                        "allocated_bytes": 3462348800,
                        "used_bytes": 333374000,
                    },
                    "batching": "mixed",
                    "version": "0.1.0",
                }
            ]
        }
    }
