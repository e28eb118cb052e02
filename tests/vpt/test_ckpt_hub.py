"""`hf-hub:` specs through the real `huggingface_hub.snapshot_download`, offline.

No network: each test lays a repo out in a Hugging Face cache directory under tmp_path, in the layout the
library itself writes (models--org--name/{blobs, snapshots/<commit>, refs/main}), and switches the library
to offline mode, in which snapshot_download resolves revisions from that cache and never opens a socket;
or points it at a local port that refuses connections (a Hub out of reach, online).
"""

from __future__ import annotations

import socket
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError

from tests.vpt import ckpt_writers as W
from vpt import VisionTransformer
from vpt.checkpoint import CheckpointError
from vpt.config import IMAGENET_MEAN, IMAGENET_STD, INCEPTION_MEAN, INCEPTION_STD, PRESETS
from vpt.fingerprint import backbone_fingerprint
from vpt.hub import HUB_ALLOW_PATTERNS, BackboneUnavailable, load_backbone

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict:
    """Offline mode plus a spy on snapshot_download that records its keyword arguments."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once at import; its request hook consults this constant.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    calls: list[dict] = []
    real = huggingface_hub.snapshot_download

    def spy(**kwargs: object) -> str:
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    return {"cache": tmp_path / "hf-cache", "calls": calls}


def test_hf_layout_repo(offline_hub: dict, tiny_vit: VisionTransformer, tmp_path: Path) -> None:
    src = W.write_hf_dir(
        tmp_path / "src", tiny_vit.state_dict(), tiny_vit.cfg, mean_std=(INCEPTION_MEAN, INCEPTION_STD)
    )
    W.populate_hf_cache(offline_hub["cache"], "acme/tiny-vit", src, COMMIT)
    bb = load_backbone("hf-hub:acme/tiny-vit", cache_dir=str(offline_hub["cache"]))
    assert bb.fingerprint == backbone_fingerprint(tiny_vit.state_dict())
    assert bb.backbone_id == "acme/tiny-vit" and bb.spec == "hf-hub:acme/tiny-vit"
    assert (bb.cfg.mean, bb.cfg.std) == (INCEPTION_MEAN, INCEPTION_STD)  # its preprocessor_config.json
    (call,) = offline_hub["calls"]  # safetensors present: no second, pickle-allowing call
    assert call["repo_id"] == "acme/tiny-vit" and call["allow_patterns"] == HUB_ALLOW_PATTERNS
    assert not any(p.endswith((".bin", ".pth")) for p in call["allow_patterns"])
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(bb.model.forward_features(x), tiny_vit.forward_features(x))


def test_revision_pinned_by_commit(offline_hub: dict, tiny_vit: VisionTransformer, tmp_path: Path) -> None:
    src = W.write_hf_dir(tmp_path / "src", tiny_vit.state_dict(), tiny_vit.cfg)
    W.populate_hf_cache(offline_hub["cache"], "acme/tiny-vit", src, COMMIT)
    bb = load_backbone(f"hf-hub:acme/tiny-vit@{COMMIT}", cache_dir=str(offline_hub["cache"]))
    assert bb.backbone_id == f"acme/tiny-vit@{COMMIT}"
    assert offline_hub["calls"][0]["revision"] == COMMIT


def test_google_in21k_uses_vpt_imagenet_normalisation(
    offline_hub: dict, tiny_vit: VisionTransformer, tmp_path: Path
) -> None:
    """google/vit-*-in21k say [-1, 1] in their preprocessor; VPT's official code used ImageNet mean/std."""
    src = W.write_hf_dir(
        tmp_path / "src", tiny_vit.state_dict(), tiny_vit.cfg, mean_std=(INCEPTION_MEAN, INCEPTION_STD)
    )
    snapshot = W.populate_hf_cache(offline_hub["cache"], "google/vit-base-patch16-224-in21k", src, COMMIT)
    bb = load_backbone("hf-hub:google/vit-base-patch16-224-in21k", cache_dir=str(offline_hub["cache"]))
    assert (bb.cfg.mean, bb.cfg.std) == (IMAGENET_MEAN, IMAGENET_STD)
    by_path = load_backbone(str(snapshot))  # the same snapshot by path: same rule, same id
    assert (by_path.cfg.mean, by_path.cfg.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert by_path.backbone_id == "google/vit-base-patch16-224-in21k"


def test_pickle_weights_only_as_fallback(
    offline_hub: dict, tiny_vit: VisionTransformer, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    W.write_hf_dir(src, tiny_vit.state_dict(), tiny_vit.cfg)
    (src / "model.safetensors").unlink()
    torch.save(W.timm_to_hf(tiny_vit.state_dict(), tiny_vit.cfg), src / "pytorch_model.bin")
    W.populate_hf_cache(offline_hub["cache"], "acme/old-vit", src, COMMIT)
    bb = load_backbone("hf-hub:acme/old-vit", cache_dir=str(offline_hub["cache"]))
    assert bb.fingerprint == backbone_fingerprint(tiny_vit.state_dict())
    first, second = offline_hub["calls"]
    assert "*.bin" not in first["allow_patterns"] and "*.bin" in second["allow_patterns"]


def test_timm_layout_repo(offline_hub: dict, tiny_vit: VisionTransformer, tmp_path: Path) -> None:
    src = W.write_timm_dir(tmp_path / "src", tiny_vit.state_dict(), tiny_vit.cfg, "vit_test_tiny")
    W.populate_hf_cache(offline_hub["cache"], "timm/vit_test_tiny.test_tag", src, COMMIT)
    bb = load_backbone("hf-hub:timm/vit_test_tiny.test_tag", cache_dir=str(offline_hub["cache"]))
    assert bb.backbone_id == "timm/vit_test_tiny.test_tag"
    assert bb.fingerprint == backbone_fingerprint(tiny_vit.state_dict())


def test_uncached_repo_offline_is_unavailable(offline_hub: dict) -> None:
    with pytest.raises(BackboneUnavailable, match="HF_HUB_OFFLINE is set, and the local cache") as e:
        load_backbone("hf-hub:acme/not-cached", cache_dir=str(offline_hub["cache"]))
    assert e.value.spec == "hf-hub:acme/not-cached"
    assert isinstance(e.value.__cause__, LocalEntryNotFoundError)  # kept for a debug traceback


def test_hub_out_of_reach_uses_the_cached_copy(
    monkeypatch: pytest.MonkeyPatch, tiny_vit: VisionTransformer, tmp_path: Path
) -> None:
    """Not offline, but the Hub refuses connections: the probe says so at once and the cache serves."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    cache = tmp_path / "hf-cache"
    src = W.write_hf_dir(tmp_path / "src", tiny_vit.state_dict(), tiny_vit.cfg)
    W.populate_hf_cache(cache, "acme/tiny-vit", src, COMMIT)
    bb = load_backbone("hf-hub:acme/tiny-vit", cache_dir=str(cache))
    assert bb.fingerprint == backbone_fingerprint(tiny_vit.state_dict())
    with pytest.raises(BackboneUnavailable, match=r"is out of reach \(.*local cache .* has no copy"):
        load_backbone("hf-hub:acme/not-cached", cache_dir=str(cache))


def test_missing_path_is_unavailable_and_names_the_ways_out(tmp_path: Path) -> None:
    with pytest.raises(BackboneUnavailable, match="no such file or directory") as e:
        load_backbone(str(tmp_path / "vit.npz"))
    assert "local checkpoint" in str(e.value) and "random:<preset>" in str(e.value)
    assert all(name in str(e.value) for name in PRESETS)


def test_bad_hub_spec() -> None:
    with pytest.raises(CheckpointError, match="<org>/<name>"):
        load_backbone("hf-hub:no-org")
