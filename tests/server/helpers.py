"""Test helpers: tiny task artifacts for a given backbone, tenants files and keyed settings."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image

from prompt_store.artifact import TaskArtifact, save_artifact
from server.settings import Settings
from server.tenants import hash_key
from vpt.hub import Backbone

BACKBONE_SPEC = "random:vit_test_tiny@0"
# A scrape token for servers that tests read /metrics from (VPT_METRICS_TOKEN), and its header.
METRICS_TOKEN = "test-metrics-token-0123456789abcdef"
METRICS_AUTH = {"authorization": f"Bearer {METRICS_TOKEN}"}


def make_artifact(
    backbone: Backbone, *, P: int, mode: str, C: int, seed: int, labels: list[str] | None = None
) -> TaskArtifact:
    cfg = backbone.cfg
    g = torch.Generator().manual_seed(seed)
    L_p = cfg.depth if mode == "deep" else 1
    return TaskArtifact(
        prompts=torch.randn(L_p, P, cfg.embed_dim, generator=g),
        head_weight=torch.randn(C, cfg.embed_dim, generator=g),
        head_bias=torch.randn(C, generator=g),
        mode=mode,  # type: ignore[arg-type]
        backbone=backbone.backbone_id,
        backbone_fingerprint=backbone.fingerprint,
        labels=labels or [f"class{i}" for i in range(C)],
    )


def artifact_bytes(backbone: Backbone, **kw: object) -> bytes:
    return save_artifact(make_artifact(backbone, **kw))  # type: ignore[arg-type]


def png_bytes(seed: int, size: tuple[int, int] = (40, 36)) -> bytes:
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def write_tenants(
    tmp: Path, keys: dict[str, str], fields: dict[str, dict[str, object]] | None = None
) -> Path:
    """`tmp/tenants.toml`: a tenant per name in `keys` (name -> API key), plus its `fields` (role,
    quotas); returns the path."""
    out = []
    for name, key in keys.items():
        out.append(f'[[tenant]]\nname = "{name}"\nkeys = ["{hash_key(key)}"]\n')
        out += [f"{k} = {v!r}\n" for k, v in (fields or {}).get(name, {}).items()]
    path = tmp / "tenants.toml"
    path.write_text("".join(out))
    return path


def keyed_settings(
    tmp: Path, keys: dict[str, str], fields: dict[str, dict[str, object]] | None = None, **kw: object
) -> Settings:
    """Settings for an in-process app with API keys (`write_tenants`), the test backbone, a store in
    `tmp`, no access log; `kw` overrides."""
    base: dict[str, object] = {
        "backbone": BACKBONE_SPEC,
        "store": str(tmp / "store"),
        "tenants_file": str(write_tenants(tmp, keys, fields)),
        "access_log": False,
    }
    return Settings(**{**base, **kw})  # type: ignore[arg-type]
