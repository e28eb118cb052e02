"""Test helpers: tiny task artifacts for a given backbone."""

from __future__ import annotations

import io

import torch
from PIL import Image

from prompt_store.artifact import TaskArtifact, save_artifact
from vpt.hub import Backbone

BACKBONE_SPEC = "random:vit_test_tiny@0"


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
