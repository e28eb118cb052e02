"""Server settings: one pydantic-settings class, environment prefix `VPT_`, built once at start-up.

Nothing reads the environment at import time; `Settings()` is constructed in `server.__main__` (or by
tests) and passed down.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The paper's backbone: ViT-B/16 pretrained on ImageNet-21k (Jia et al. 2022, Sec. 4.1).
DEFAULT_BACKBONE = "hf-hub:google/vit-base-patch16-224-in21k"


class Settings(BaseSettings):
    # Errors name the setting and the rule, not the value: a model-level error would otherwise print
    # every input, VPT_METRICS_TOKEN included.
    model_config = SettingsConfigDict(
        env_prefix="VPT_", env_file=None, extra="ignore", hide_input_in_errors=True
    )

    # --- model -----------------------------------------------------------------------------------
    backbone: str = Field(
        DEFAULT_BACKBONE,
        description="Backbone spec: hf-hub:<repo>[@rev], a local checkpoint path, or random:<preset>[@seed]",
    )
    device: str = Field("auto", description="auto (CUDA if present), cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto = bfloat16 on GPU, float32 on CPU"
    )
    img_size: int | None = Field(
        None, description="Override the input size (positional embedding is resized)"
    )
    compile: bool = Field(False, description="torch.compile the backbone (slower start, faster steady state)")
    cuda_graph_max_batch: int = Field(
        8,
        ge=0,
        le=256,
        description="CUDA: replay batches of up to this many images as CUDA graphs (one launch instead of "
        "~200 per forward: batch-1 latency 3.4 -> 1.1 ms for ViT-B/16 on an H200); 0 = off. Captured at "
        "start-up, checked against eager mode; ignored on CPU and with VPT_COMPILE",
    )
    engine_process: bool = Field(
        True,
        description="CPU: compute in an engine process of its own, out of reach of the HTTP front end's "
        "GIL (under a flood of refused requests another tenant's compute stayed at its solo speed "
        "instead of slowing ~2x); ignored on CUDA",
    )
    torch_threads: int = Field(
        0,
        ge=0,
        description="torch's threads for the forward (in the engine process on CPU); 0 = auto (all cores "
        "but one on CPU, torch's default on GPU)",
    )
    pin_threads: bool = Field(
        True,
        description="CPU: keep the engine (its process or thread, and torch's threads) on the last "
        "VPT_TORCH_THREADS of the allowed CPUs, where the other threads' work does not move it or evict "
        "its caches",
    )
    gil_switch_interval_ms: float = Field(
        0.1,
        gt=0,
        description="Python's GIL switch interval in the server process: its threads (event loop, decoders, "
        "and the engine thread when it computes in process) hand the GIL over sooner than with Python's "
        "default 5 ms, which made the engine thread wait for the event loop between torch ops",
    )
    hf_cache_dir: str | None = Field(
        None, description="Where hf-hub: backbones are cached (default: HF_HOME)"
    )

    # --- storage ---------------------------------------------------------------------------------
    store: str = Field(
        "./data/store", description="Prompt store URL: a path, file:///path or s3://bucket/prefix"
    )
    keep_versions: int = Field(10, ge=1, description="Versions kept per task (older ones are pruned)")
    version_ttl_s: float = Field(
        2.0, ge=0, description="Max staleness of a task's current version (replicas)"
    )
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, R2, Ceph, moto)")
    s3_region: str | None = Field(None, description="S3 region (else AWS_REGION / AWS_DEFAULT_REGION)")

    # --- HTTP ------------------------------------------------------------------------------------
    api_servers: int | None = Field(
        None,
        ge=0,
        le=64,
        description="API-server processes (HTTP, auth, parsing, decoding) in front of one engine-core "
        "process (engine, bank, scheduler), sharing the port; 0 = one process does everything. Unset: half "
        "the CPUs up to 8 on CUDA, 0 on CPU (docs/architecture.md)",
    )
    api_arena_bytes: int = Field(
        0,
        ge=0,
        description="Shared memory per API server for decoded images on their way to the engine core; "
        "0 = two of the largest requests (twice that with VPT_GPU_DECODE: JPEG bytes), at least 32 MiB",
    )
    host: str = Field("127.0.0.1", description="Bind address (0.0.0.0 to serve other hosts)")
    port: int = Field(8000, ge=0, le=65535, description="Bind port")
    log_level: str = Field("info", description="debug, info, warning, error")
    access_log: bool = Field(True, description="JSON access log line per request")

    # --- metrics ---------------------------------------------------------------------------------
    metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Serve /metrics on this port alone (for Prometheus on the internal network) and no "
        "longer on VPT_PORT. Unset: /metrics on VPT_PORT, which needs VPT_METRICS_TOKEN if set, else an "
        "admin API key (any caller in open mode). The image sets 9464",
    )
    metrics_host: str | None = Field(None, description="Bind address of the metrics port (default: VPT_HOST)")
    metrics_token: SecretStr | None = Field(
        None,
        description="Bearer token a scrape of /metrics must send (`Authorization: Bearer <token>`), on "
        "either port; at least 16 characters. Never logged",
    )
    metrics_token_file: str | None = Field(
        None,
        description="A file holding VPT_METRICS_TOKEN (a Docker or Kubernetes secret), read at start-up",
    )
    metrics_tenant_labels: bool = Field(
        True,
        description="Export vpt_tenant_requests_total{tenant,route,status} (tenant names and their "
        "traffic). Off where the metrics leave the operator's hands (a shared or hosted Prometheus)",
    )

    # --- batching and queues -----------------------------------------------------------------------
    max_batch_size: int = Field(64, ge=1, description="Images per forward pass")
    max_batch_delay_ms: float = Field(0.0, ge=0, description="Wait this long for a fuller batch when idle")
    max_queue_images: int = Field(4096, ge=1, description="Images queued across tenants before 429")
    batching: Literal["mixed", "per_task"] = Field("mixed", description="per_task = baseline for benchmarks")
    pipeline_depth: int = Field(0, ge=0, description="Batches in flight; 0 = auto (2 on CUDA, 1 on CPU)")
    preempt: bool = Field(
        True,
        description="CPU, one batch in flight: a less-served tenant's new request may run between two "
        "blocks of another tenant's running batch (it waits one block, not one batch)",
    )
    request_timeout_s: float = Field(30.0, gt=0, description="Deadline of a request; 504 after it")
    decode_threads: int = Field(0, ge=0, description="Image decode threads; 0 = number of CPUs")
    gpu_decode: bool = Field(
        False,
        description="CUDA only: decode JPEGs at least twice the resize side with nvJPEG "
        "(torchvision.io.decode_jpeg) and resize them on the GPU when torchvision is installed; Pillow "
        "otherwise. Opt-in: it differs from Pillow's (the trainer's) transform by ~0.05-0.4 uint8 levels. "
        "The engine core decodes them; API servers hand it the JPEGs' bytes",
    )

    # --- prompt bank -----------------------------------------------------------------------------
    bank_slots: int = Field(1024, ge=1, description="Max resident tasks")
    bank_bytes: int = Field(4 * 1024**3, ge=1, description="Device bytes for the bank (caps the slots)")
    max_prompt_length: int = Field(100, ge=0, description="Largest P a task may have (slot size)")
    max_classes: int = Field(1000, ge=1, description="Largest C a task may have (slot size)")
    pinned_tasks: list[str] = Field(default_factory=list, description="tenant/task ids never evicted")

    # --- limits ------------------------------------------------------------------------------------
    max_images_per_request: int = Field(64, ge=1, description="Images in one classify/embed request")
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1, description="Encoded bytes of one image")
    max_image_pixels: int = Field(40_000_000, ge=1, description="Decompression-bomb guard")
    max_body_bytes: int = Field(100 * 1024 * 1024, ge=1, description="Bytes of one request body")
    max_artifact_bytes: int = Field(64 * 1024 * 1024, ge=1, description="Bytes of one task artifact")
    max_top_k: int = Field(100, ge=1, description="Largest top_k a request may ask for")

    # --- tenancy ---------------------------------------------------------------------------------------
    tenants_file: str = Field(
        "./data/tenants.toml",
        description="Tenants, roles, key hashes and quotas (TOML). Created with one admin key if missing",
    )
    open_mode: bool = Field(
        False, description="No API keys: every caller is the admin of default_tenant (dev only)"
    )
    open_mode_force: bool = Field(False, description="Allow open mode on a non-loopback bind")
    default_tenant: str = Field("default", description="The tenant open-mode callers act as")

    # --- fault injection (tests only) -------------------------------------------------------------------
    fault_oom_over: int = Field(0, ge=0, description="Test hook: batches over N images raise out-of-memory")
    fault_fail_every: int = Field(0, ge=0, description="Test hook: every N-th batch raises an engine error")

    @field_validator("pinned_tasks")
    @classmethod
    def _check_pinned(cls, v: list[str]) -> list[str]:
        for item in v:
            if item.count("/") != 1:
                raise ValueError(f"pinned task {item!r} must be 'tenant/task'")
        return v

    @model_validator(mode="after")
    def _check_metrics(self) -> Settings:
        if self.metrics_token_file is not None:
            if self.metrics_token is not None:
                raise ValueError("set VPT_METRICS_TOKEN or VPT_METRICS_TOKEN_FILE, not both")
            try:
                self.metrics_token = SecretStr(Path(self.metrics_token_file).read_text().strip())
            except OSError as e:
                raise ValueError(
                    f"VPT_METRICS_TOKEN_FILE: cannot read {self.metrics_token_file}: {e}"
                ) from None
        if self.metrics_token is not None and len(self.metrics_token.get_secret_value()) < 16:
            raise ValueError("VPT_METRICS_TOKEN must have at least 16 characters (e.g. openssl rand -hex 32)")
        if self.metrics_port is not None and self.metrics_port == self.port:
            raise ValueError("VPT_METRICS_PORT must differ from VPT_PORT")
        return self

    def effective_api_servers(self, device_type: str, cpus: int) -> int:
        if self.api_servers is not None:
            return self.api_servers
        return default_api_servers(device_type, cpus)

    def effective_pipeline_depth(self, device_type: str) -> int:
        if self.pipeline_depth:
            return self.pipeline_depth
        return 2 if device_type == "cuda" else 1

    def effective_engine_process(self, device_type: str) -> bool:
        return self.engine_process and device_type == "cpu"

    def effective_preempt(self, device_type: str) -> bool:
        """Preemption between blocks: CPU only (a GPU overlaps batches instead), with one batch in flight
        (it tracks one running batch) and an eager backbone (a compiled forward has no block boundaries)."""
        return (
            self.preempt
            and device_type == "cpu"
            and self.effective_pipeline_depth(device_type) == 1
            and not self.compile
        )


def default_api_servers(device_type: str, cpus: int) -> int:
    """API servers when VPT_API_SERVERS is unset (docs/architecture.md, "How many API servers"; the
    measurements in docs/benchmarks.md). CUDA: half the CPUs, up to 8 — each API server handles ~620
    one-JPEG requests/s on a core, the engine core ~10,000, the device thousands. CPU: none — the engine,
    not the front end, bounds a CPU server (ViT-B/16: ~185 ms of CPU per image against the front end's
    ~1.5 ms), and the inter-process hop cost 12-18 % of the mixed peak on 2 cores."""
    if device_type == "cuda":
        return max(1, min(8, cpus // 2))
    return 0


def settings_markdown() -> str:
    """The settings table for docs/configuration.md (`python -m server.settings` prints it)."""
    rows = ["| variable | default | description |", "|---|---|---|"]
    for name, f in Settings.model_fields.items():
        default = f.default_factory() if f.default_factory is not None else f.default  # type: ignore[call-arg]
        rows.append(f"| `VPT_{name.upper()}` | `{default!r}` | {f.description or ''} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_markdown())
