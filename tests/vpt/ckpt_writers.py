"""Test helpers: write one set of timm-named weights in every checkpoint format we load.

These are the inverse converters of `vpt.checkpoint` (timm → HF transformers, timm → Google .npz), kept
in tests so the package only ever reads. The HF writer is validated independently: `test_hf_parity.py`
loads its output with `transformers.ViTModel.from_pretrained`. Layouts follow the references cited in
`vpt/checkpoint.py` (HF's on-disk names, Flax kernel shapes, timm's hub `config.json`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor

from vpt import ViTConfig


def _plain(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def timm_to_hf(sd: Mapping[str, Tensor], cfg: ViTConfig, prefix: str = "") -> dict[str, Tensor]:
    """Our names → transformers' on-disk ViT names (split q/k/v); `prefix="vit."` for ForImageClassification."""
    D = cfg.embed_dim
    out = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.position_embeddings": sd["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"],
        "layernorm.bias": sd["norm.bias"],
    }
    renames = {
        "norm1": "layernorm_before",
        "norm2": "layernorm_after",
        "attn.proj": "attention.output.dense",
        "mlp.fc1": "intermediate.dense",
        "mlp.fc2": "output.dense",
    }
    for i in range(cfg.depth):
        b, h = f"blocks.{i}.", f"encoder.layer.{i}."
        for ours, theirs in renames.items():
            for p in ("weight", "bias"):
                out[h + f"{theirs}.{p}"] = sd[b + f"{ours}.{p}"]
        for p in ("weight", "bias"):
            if b + f"attn.qkv.{p}" in sd:
                for j, name in enumerate(("query", "key", "value")):
                    out[h + f"attention.attention.{name}.{p}"] = sd[b + f"attn.qkv.{p}"][j * D : (j + 1) * D]
    return {prefix + k: v.contiguous() for k, v in out.items()}


def timm_to_npz(
    sd: Mapping[str, Tensor], cfg: ViTConfig, mlp_scope: str = "MlpBlock_3"
) -> dict[str, np.ndarray]:
    """Our names → Google ViT .npz names and Flax kernel layouts (the original ViT export numbering)."""
    D, H, hd = cfg.embed_dim, cfg.num_heads, cfg.head_dim

    def a(t: Tensor) -> np.ndarray:
        return t.detach().float().contiguous().numpy().copy()

    out = {
        "embedding/kernel": a(sd["patch_embed.proj.weight"].permute(2, 3, 1, 0)),  # OIHW → HWIO
        "embedding/bias": a(sd["patch_embed.proj.bias"]),
        "cls": a(sd["cls_token"]),
        "Transformer/posembed_input/pos_embedding": a(sd["pos_embed"]),
        "Transformer/encoder_norm/scale": a(sd["norm.weight"]),
        "Transformer/encoder_norm/bias": a(sd["norm.bias"]),
    }
    for i in range(cfg.depth):
        b, g = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        out[g + "LayerNorm_0/scale"], out[g + "LayerNorm_0/bias"] = (
            a(sd[b + "norm1.weight"]),
            a(sd[b + "norm1.bias"]),
        )
        out[g + "LayerNorm_2/scale"], out[g + "LayerNorm_2/bias"] = (
            a(sd[b + "norm2.weight"]),
            a(sd[b + "norm2.bias"]),
        )
        qkv_w = sd[b + "attn.qkv.weight"]
        for j, name in enumerate(("query", "key", "value")):
            w = qkv_w[j * D : (j + 1) * D]  # (H*hd, D)
            out[g + f"MultiHeadDotProductAttention_1/{name}/kernel"] = a(w.T.reshape(D, H, hd))
            if b + "attn.qkv.bias" in sd:
                bias = sd[b + "attn.qkv.bias"][j * D : (j + 1) * D]
                out[g + f"MultiHeadDotProductAttention_1/{name}/bias"] = a(bias.reshape(H, hd))
        out[g + "MultiHeadDotProductAttention_1/out/kernel"] = a(
            sd[b + "attn.proj.weight"].T.reshape(H, hd, D)
        )
        out[g + "MultiHeadDotProductAttention_1/out/bias"] = a(sd[b + "attn.proj.bias"])
        for fc, dense in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
            out[g + f"{mlp_scope}/{dense}/kernel"] = a(sd[b + f"mlp.{fc}.weight"].T)
            out[g + f"{mlp_scope}/{dense}/bias"] = a(sd[b + f"mlp.{fc}.bias"])
    return out


def write_timm_safetensors(
    path: Path, sd: Mapping[str, Tensor], extra: Mapping[str, Tensor] | None = None
) -> Path:
    save_file({**_plain(sd), **_plain(extra or {})}, str(path))
    return path


def write_timm_pth(path: Path, sd: Mapping[str, Tensor], wrapper: str | None = None, **extra: object) -> Path:
    obj: object = _plain(sd) if wrapper is None else {wrapper: _plain(sd), **extra}
    torch.save(obj, path)
    return path


def write_npz(
    path: Path, sd: Mapping[str, Tensor], cfg: ViTConfig, with_head: bool = True, **kw: str
) -> Path:
    arrays = timm_to_npz(sd, cfg, **kw)
    if with_head:  # as in the paper's imagenet21k_ViT-B_16.npz: a representation layer and a 21k head
        rng = np.random.default_rng(0)
        D = cfg.embed_dim
        arrays["pre_logits/kernel"] = rng.standard_normal((D, D)).astype(np.float32)
        arrays["pre_logits/bias"] = np.zeros(D, np.float32)
        arrays["head/kernel"] = rng.standard_normal((D, 5)).astype(np.float32)
        arrays["head/bias"] = np.zeros(5, np.float32)
    np.savez(path, **arrays)
    return path


def hf_config(cfg: ViTConfig, layer_norm_eps: float | None = None, architectures: str = "ViTModel") -> dict:
    return {
        "architectures": [architectures],
        "model_type": "vit",
        "hidden_size": cfg.embed_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": int(cfg.embed_dim * cfg.mlp_ratio),
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": cfg.layer_norm_eps if layer_norm_eps is None else layer_norm_eps,
        "image_size": cfg.img_size,
        "patch_size": cfg.patch_size,
        "num_channels": cfg.in_chans,
        "qkv_bias": cfg.qkv_bias,
        "encoder_stride": cfg.patch_size,
    }


def write_hf_dir(
    path: Path,
    sd: Mapping[str, Tensor],
    cfg: ViTConfig,
    *,
    layer_norm_eps: float | None = None,
    mean_std: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
    classifier: int = 0,
) -> Path:
    """config.json + model.safetensors (+ preprocessor_config.json), as `save_pretrained` writes them.
    `classifier=C` writes a ViTForImageClassification (`vit.` prefix, a C-way classifier)."""
    path.mkdir(parents=True, exist_ok=True)
    arch = "ViTForImageClassification" if classifier else "ViTModel"
    tensors = timm_to_hf(sd, cfg, prefix="vit." if classifier else "")
    if classifier:
        tensors["classifier.weight"] = torch.randn(classifier, cfg.embed_dim)
        tensors["classifier.bias"] = torch.zeros(classifier)
    save_file(_plain(tensors), str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf_config(cfg, layer_norm_eps, arch), indent=2))
    if mean_std is not None:
        pre = {
            "image_processor_type": "ViTImageProcessor",
            "image_mean": mean_std[0],
            "image_std": mean_std[1],
        }
        (path / "preprocessor_config.json").write_text(json.dumps(pre))
    return path


def write_timm_dir(
    path: Path,
    sd: Mapping[str, Tensor],
    cfg: ViTConfig,
    architecture: str,
    *,
    tag: str = "test_tag",
    model_args: dict | None = None,
) -> Path:
    """timm's `push_to_hub` layout: config.json (architecture, pretrained_cfg) + model.safetensors."""
    path.mkdir(parents=True, exist_ok=True)
    save_file(_plain(sd), str(path / "model.safetensors"))
    conf: dict = {
        "architecture": architecture,
        "num_classes": 0,
        "num_features": cfg.embed_dim,
        "global_pool": "token",
        "pretrained_cfg": {
            "tag": tag,
            "input_size": [3, cfg.img_size, cfg.img_size],
            "interpolation": "bicubic",
            "crop_pct": 0.9,
            "mean": list(cfg.mean),
            "std": list(cfg.std),
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }
    if model_args is not None:
        conf["model_args"] = model_args
    (path / "config.json").write_text(json.dumps(conf, indent=2))
    return path


def populate_hf_cache(cache_dir: Path, repo_id: str, source_dir: Path, commit: str = "a" * 40) -> Path:
    """Lay `source_dir`'s files out as huggingface_hub's cache does: blobs named by content hash,
    snapshots/<commit>/<file> symlinks to them, refs/main holding the commit. Returns the snapshot dir."""
    repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in sorted(source_dir.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        shutil.copyfile(f, blob)
        (snapshot / f.name).symlink_to(Path("../..") / "blobs" / digest)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
