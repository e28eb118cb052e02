"""Backbone fingerprint (vpt.fingerprint) and `random:` backbones (vpt.hub).

The "v1" algorithm is re-implemented here from its documented description (docs/backbones.md) with plain
numpy and hashlib, so the implementation cannot drift from the documentation unnoticed.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import pytest
import torch

from tests.vpt import ckpt_writers as W
from vpt import VisionTransformer, fingerprint
from vpt.checkpoint import CheckpointError
from vpt.fingerprint import backbone_fingerprint
from vpt.hub import load_backbone


def documented_v1(sd: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(b"vpt-backbone-fingerprint/v1\0")
    for name in sorted(sd):
        t = sd[name]
        h.update(f"{name}\0{','.join(str(d) for d in t.shape)}\0".encode())
        h.update(t.float().numpy().astype("<f4").tobytes(order="C"))
    return "v1:" + h.hexdigest()


@pytest.mark.parametrize("chunk", [None, 7])
def test_matches_documented_algorithm(
    chunk: int | None, sd_small: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    if chunk is not None:  # tensors hashed in many pieces must give the same digest as in one
        monkeypatch.setattr(fingerprint, "_CHUNK", chunk)
    fp = backbone_fingerprint(sd_small)
    assert re.fullmatch(r"v1:[0-9a-f]{64}", fp)
    assert fp == documented_v1(sd_small)


@pytest.fixture
def sd_small() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "b.weight": torch.randn(3, 5, generator=g),
        "a.bias": torch.randn(7, generator=g),
        "c": torch.randn(2, 2, 2, generator=g).to(torch.bfloat16),  # widened to f32 exactly
    }


def test_sensitive_to_values_names_and_shapes(sd_small: dict) -> None:
    fp = backbone_fingerprint(sd_small)
    one_ulp = dict(sd_small)
    w = sd_small["b.weight"].clone()
    w[1, 2] = torch.nextafter(w[1, 2], torch.tensor(float("inf")))
    one_ulp["b.weight"] = w
    assert backbone_fingerprint(one_ulp) != fp
    renamed = {("z" if k == "a.bias" else k): v for k, v in sd_small.items()}
    assert backbone_fingerprint(renamed) != fp
    reshaped = {**sd_small, "b.weight": sd_small["b.weight"].reshape(5, 3)}  # same bytes, other shape
    assert backbone_fingerprint(reshaped) != fp


def test_independent_of_storage_dtype_and_order(sd_small: dict) -> None:
    """fp16/bf16-representable values give the digest of their exact fp32 widening; dict order is irrelevant."""
    fp = backbone_fingerprint(sd_small)
    as_f32 = {k: v.float() for k, v in reversed(list(sd_small.items()))}
    assert backbone_fingerprint(as_f32) == fp
    halves = {k: v.half() for k, v in sd_small.items()}
    assert backbone_fingerprint(halves) == backbone_fingerprint({k: v.float() for k, v in halves.items()})


def test_refuses_non_float_and_empty() -> None:
    with pytest.raises(TypeError, match="idx"):
        backbone_fingerprint({"idx": torch.arange(3)})
    with pytest.raises(ValueError, match="empty"):
        backbone_fingerprint({})


def test_unchanged_by_run_dtype(tiny_vit: VisionTransformer, tmp_path: Path) -> None:
    path = W.write_timm_safetensors(tmp_path / "w.safetensors", tiny_vit.state_dict())
    f32 = load_backbone(str(path))
    bf16 = load_backbone(str(path), dtype=torch.bfloat16)
    assert bf16.model.pos_embed.dtype == torch.bfloat16
    assert bf16.fingerprint == f32.fingerprint == backbone_fingerprint(tiny_vit.state_dict())
    # ... whereas hashing the bf16-rounded weights would give another digest: the cast must come after.
    assert backbone_fingerprint(bf16.model.state_dict()) != f32.fingerprint


# ------------------------------------------------------------------------------ random: backbones
def test_random_is_deterministic_per_seed(tiny_vit: VisionTransformer) -> None:
    a, b = load_backbone("random:vit_test_tiny@0"), load_backbone("random:vit_test_tiny")
    assert a.fingerprint == b.fingerprint  # default seed 0
    assert a.backbone_id == b.backbone_id == "random:vit_test_tiny@0"
    # The same weights as the shared test fixture (seeded init_random on the CPU).
    assert a.fingerprint == backbone_fingerprint(tiny_vit.state_dict())
    assert load_backbone("random:vit_test_tiny@1").fingerprint != a.fingerprint
    assert load_backbone("random:vit_test_small@0").fingerprint != a.fingerprint


def test_random_does_not_touch_global_rng() -> None:
    state = torch.get_rng_state()
    load_backbone("random:vit_test_small@3")
    assert torch.equal(torch.get_rng_state(), state)


def test_random_warns_loudly(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="vpt.hub"):
        bb = load_backbone("random:vit_test_tiny@7", img_size=48)
    assert any(r.levelno == logging.WARNING and "RANDOM" in r.getMessage() for r in caplog.records)
    assert bb.cfg.img_size == 48 and bb.model.pos_embed.shape == (1, 37, 64)


@pytest.mark.parametrize("spec", ["random:no_such_preset", "random:vit_test_tiny@x"])
def test_bad_random_spec(spec: str) -> None:
    with pytest.raises(CheckpointError, match="bad random backbone spec"):
        load_backbone(spec)
