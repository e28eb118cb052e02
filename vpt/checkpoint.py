"""Pure checkpoint converters: timm, Hugging Face transformers and Google .npz ViT weights → our names.

References:
- timm `timm/models/vision_transformer.py`: `checkpoint_filter_fn` (recognise the source by its keys,
  dispatch to small `_convert_*` helpers) and `_load_weights` (the Google .npz layout); our parameter
  names are timm's, so a timm state dict needs no renaming at all;
- Hugging Face transformers `models/vit/modeling_vit.py` and `convert_vit_timm_to_pytorch.py` (the HF
  names; on disk they are still the pre-5.0 ones, `encoder.layer.N.attention.attention.query`, and
  transformers >= 5 renames them in memory to `layers.N.attention.q_proj` — both are accepted);
- google-research/vision_transformer `vit_jax/checkpoint.py` and `models_vit.py` (.npz names, Flax
  kernel layouts), the format of the VPT paper's backbone `imagenet21k_ViT-B_16.npz` (Jia et al.,
  ECCV 2022, arXiv 2203.12119).

Everything here is a function of tensors: no files, no network, no model. `vpt.hub` does the I/O.
Output names are exactly `VisionTransformer.state_dict()`'s; anything that is neither converted nor in
a *named* drop list is passed through unchanged, so strict loading reports it as unexpected.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vpt.config import PRESETS, ViTConfig

SourceFormat = Literal["timm", "hf", "npz"]

# Extras that belong to a classifier head, never to the frozen feature extractor VPT reads (CLS after the
# final norm). Each is a named case; anything else unexpected is an error.
TIMM_DROPPED = ("head.", "pre_logits.")  # pre_logits.fc: old timm in21k representation layer
HF_DROPPED = ("pooler.", "classifier.", "embeddings.mask_token")  # pooler = dense+tanh on CLS (≈ pre_logits)
NPZ_DROPPED = ("head/", "pre_logits/")


class CheckpointError(ValueError):
    """A checkpoint cannot become our backbone; the message names the offending key, shape or file."""


# ---------------------------------------------------------------------------------------------- detection
def detect_format(state_dict: Mapping[str, object]) -> SourceFormat:
    """Which family a state dict comes from, recognised by a key only that family has."""
    keys = set(state_dict)
    if any(k.endswith("embedding/kernel") for k in keys):
        return "npz"
    if any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in keys):
        return "hf"
    if any(k.endswith("patch_embed.proj.weight") for k in keys):
        return "timm"
    sample = ", ".join(sorted(keys)[:8]) or "(no keys)"
    raise CheckpointError(
        "unrecognised checkpoint: expected timm (patch_embed.proj.weight), Hugging Face "
        f"(embeddings.patch_embeddings.projection.weight) or Google .npz (embedding/kernel) keys; found {sample}"
    )


def _strip_prefix(state_dict: Mapping[str, Tensor], marker: str, prefixes: tuple[str, ...]) -> dict:
    """Remove a wrapper prefix (e.g. `vit.` of ViTForImageClassification, `module.` of DDP) when the
    marker key carries it. Keys outside the prefix (a classifier next to `vit.`) keep their names."""
    for prefix in prefixes:
        if prefix + marker in state_dict:
            return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state_dict.items()}
    return dict(state_dict)


# ---------------------------------------------------------------------------------------------- timm
def _convert_timm(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    sd = _strip_prefix(state_dict, "patch_embed.proj.weight", ("module.",))
    if any(k.startswith("fc_norm.") for k in sd) and "norm.weight" not in sd:
        # timm's global_pool="avg" models normalise the pooled mean (fc_norm) and have norm=Identity;
        # VPT's head reads the CLS token after `norm`, which such a model does not have.
        raise CheckpointError(
            "checkpoint has fc_norm.* but no norm.*: it is an average-pooling timm model; VPT needs the "
            "CLS-token model (global_pool='token') whose final norm is `norm`"
        )
    # fc_norm next to a real `norm` only normalises the pooled feature for the classifier: head side.
    dropped = (*TIMM_DROPPED, "fc_norm.")
    return {k: v for k, v in sd.items() if not k.startswith(dropped)}


# ---------------------------------------------------------------------------------------------- HF
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
# Per-layer: on-disk (pre-5.0) names and transformers >= 5 in-memory names.
_HF_LAYER = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")
_HF_QKV = {
    "attention.attention.query": 0,
    "attention.attention.key": 1,
    "attention.attention.value": 2,
    "attention.q_proj": 0,
    "attention.k_proj": 1,
    "attention.v_proj": 2,
}
_HF_RENAME = {
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",  # the layer's own output, not attention.output (matched whole above)
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
}


def _convert_hf(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    sd = _strip_prefix(state_dict, "embeddings.patch_embeddings.projection.weight", ("vit.", "module.vit."))
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], list[Tensor | None]] = {}  # (layer, weight|bias) → [q, k, v]
    for key, value in sd.items():
        if key.startswith(HF_DROPPED):
            continue
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
            continue
        m = _HF_LAYER.match(key)
        if m is None:
            out[key] = value  # unknown: strict loading will name it
            continue
        layer, module, param = m.groups()
        if module in _HF_QKV:
            qkv.setdefault((layer, param), [None, None, None])[_HF_QKV[module]] = value
        elif module in _HF_RENAME:
            out[f"blocks.{layer}.{_HF_RENAME[module]}.{param}"] = value
        else:
            out[key] = value
    for (layer, param), parts in qkv.items():
        if any(p is None for p in parts):
            absent = [n for n, p in zip(("query", "key", "value"), parts, strict=True) if p is None]
            raise CheckpointError(f"layer {layer}: attention {param} has no {'/'.join(absent)} part")
        # timm's fused projection stacks q, k, v along the output dim: rows [0:D]=q, [D:2D]=k, [2D:3D]=v.
        out[f"blocks.{layer}.attn.qkv.{param}"] = torch.cat(parts, dim=0)  # type: ignore[arg-type]
    return out


# ---------------------------------------------------------------------------------------------- npz
_NPZ_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/([A-Za-z]+)_(\d+)/(.+)$")
_NPZ_TOP = {
    "embedding/bias": "patch_embed.proj.bias",
    "cls": "cls_token",
    "Transformer/posembed_input/pos_embedding": "pos_embed",
    "Transformer/encoder_norm/scale": "norm.weight",
    "Transformer/encoder_norm/bias": "norm.bias",
}


def _t(a: np.ndarray | Tensor) -> Tensor:
    return a if isinstance(a, Tensor) else torch.from_numpy(np.ascontiguousarray(a))


def _convert_npz_block(i: str, scopes: dict[tuple[str, int], dict[str, Tensor]]) -> dict[str, Tensor]:
    """One `encoderblock_i`. Sub-scope numbers differ between exports (original ViT: LayerNorm_0,
    MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3; big_vision: LayerNorm_0, MHDPA_0,
    LayerNorm_1, MlpBlock_0), so they are read by kind and order, not by fixed number."""
    by_kind: dict[str, list[int]] = {}
    for kind, n in scopes:
        by_kind.setdefault(kind, []).append(n)
    lns = sorted(by_kind.get("LayerNorm", []))
    mha = by_kind.get("MultiHeadDotProductAttention", [])
    mlp = by_kind.get("MlpBlock", [])
    if len(lns) != 2 or len(mha) != 1 or len(mlp) != 1:
        found = ", ".join(f"{k}_{n}" for k, n in sorted(scopes))
        raise CheckpointError(
            f"Transformer/encoderblock_{i}: expected 2 LayerNorm, 1 MultiHeadDotProductAttention and 1 "
            f"MlpBlock scopes, found {found}"
        )
    p = f"blocks.{i}."
    out: dict[str, Tensor] = {}

    def take(scope: dict[str, Tensor], name: str, where: str) -> Tensor:
        if name not in scope:
            raise CheckpointError(f"missing key Transformer/encoderblock_{i}/{where}/{name}")
        return scope.pop(name)

    for norm, n in zip(("norm1", "norm2"), lns, strict=True):
        s = scopes[("LayerNorm", n)]
        out[p + norm + ".weight"] = take(s, "scale", f"LayerNorm_{n}")
        out[p + norm + ".bias"] = take(s, "bias", f"LayerNorm_{n}")

    where = f"MultiHeadDotProductAttention_{mha[0]}"
    s = scopes[("MultiHeadDotProductAttention", mha[0])]
    # Flax DenseGeneral kernels: q/k/v (D, heads, head_dim), out (heads, head_dim, D). nn.Linear wants
    # (out_features, in_features), hence flatten the head axes and transpose.
    q, k, v = (take(s, f"{n}/kernel", where) for n in ("query", "key", "value"))
    D = q.shape[0]
    out[p + "attn.qkv.weight"] = torch.cat([w.reshape(D, -1).T for w in (q, k, v)], dim=0)  # (3D, D)
    biases = [s.pop(f"{n}/bias", None) for n in ("query", "key", "value")]
    if any(b is not None for b in biases):
        if any(b is None for b in biases):
            raise CheckpointError(
                f"Transformer/encoderblock_{i}/{where}: q/k/v biases are only partly present"
            )
        out[p + "attn.qkv.bias"] = torch.cat([b.reshape(-1) for b in biases], dim=0)  # type: ignore[union-attr]
    o = take(s, "out/kernel", where)
    out[p + "attn.proj.weight"] = o.reshape(-1, o.shape[-1]).T  # (H, hd, D) → (D, H*hd)
    out[p + "attn.proj.bias"] = take(s, "out/bias", where)

    where = f"MlpBlock_{mlp[0]}"
    s = scopes[("MlpBlock", mlp[0])]
    for dense, fc in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
        out[p + f"mlp.{fc}.weight"] = take(s, f"{dense}/kernel", where).T  # (in, out) → (out, in)
        out[p + f"mlp.{fc}.bias"] = take(s, f"{dense}/bias", where)

    for (kind, n), rest in scopes.items():  # leftovers keep their npz names → reported as unexpected
        for name, value in rest.items():
            out[f"Transformer/encoderblock_{i}/{kind}_{n}/{name}"] = value
    return {k: v.contiguous() for k, v in out.items()}


def _convert_npz(state_dict: Mapping[str, np.ndarray | Tensor]) -> dict[str, Tensor]:
    # Checkpoints saved from a training state carry the params under `opt/target/` (timm handles the same).
    sd = _strip_prefix(state_dict, "embedding/kernel", ("opt/target/", "params/"))  # type: ignore[arg-type]
    out: dict[str, Tensor] = {}
    blocks: dict[str, dict[tuple[str, int], dict[str, Tensor]]] = {}
    for key, value in sd.items():
        if key.startswith(NPZ_DROPPED):
            continue
        if key == "embedding/kernel":
            # Flax Conv kernel HWIO (p, p, C, D) → torch OIHW (D, C, p, p).
            out["patch_embed.proj.weight"] = _t(value).permute(3, 2, 0, 1).contiguous()
        elif key in _NPZ_TOP:
            out[_NPZ_TOP[key]] = _t(value)
        elif m := _NPZ_BLOCK.match(key):
            i, kind, n, rest = m.groups()
            blocks.setdefault(i, {}).setdefault((kind, int(n)), {})[rest] = _t(value)
        else:
            out[key] = _t(value)
    for i, scopes in blocks.items():
        out.update(_convert_npz_block(i, scopes))
    return out


def npz_num_heads(state_dict: Mapping[str, np.ndarray | Tensor]) -> int | None:
    """Google .npz keeps the head split in the query kernel's shape (D, heads, head_dim): the one format
    whose weights say how many heads there are."""
    for key, value in state_dict.items():
        if (
            re.search(r"encoderblock_0/MultiHeadDotProductAttention_\d+/query/kernel$", key)
            and value.ndim == 3
        ):
            return int(value.shape[1])
    return None


# ---------------------------------------------------------------------------------------------- public
_CONVERTERS = {"timm": _convert_timm, "hf": _convert_hf, "npz": _convert_npz}


def convert_to_timm(state_dict: Mapping[str, Tensor | np.ndarray]) -> dict[str, Tensor]:
    """Any supported source → our (timm) names, head-side extras dropped; no resizing."""
    return _CONVERTERS[detect_format(state_dict)](state_dict)  # type: ignore[operator]


def resample_pos_embed(pos_embed: Tensor, new_grid: int, num_prefix_tokens: int = 1) -> Tensor:
    """Resize the patch part of a (1, prefix + g*g, D) positional embedding to new_grid², bicubic.

    As timm's `resample_abs_pos_embed`: the CLS row is kept as is, the grid is interpolated in float32
    with `align_corners=False` and antialiasing (PIL-style bicubic; it only matters when shrinking).
    Returns the input tensor itself when the grid already has the requested size.
    """
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    n, D = grid.shape[1], grid.shape[2]
    old = math.isqrt(n)
    if old * old != n:
        raise CheckpointError(f"pos_embed has {n} patch positions, not a square grid")
    if old == new_grid:
        return pos_embed
    g = grid.reshape(1, old, old, D).permute(0, 3, 1, 2).float()  # (1, D, old, old)
    g = F.interpolate(g, size=(new_grid, new_grid), mode="bicubic", align_corners=False, antialias=True)
    g = g.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, D).to(pos_embed.dtype)  # (1, new², D)
    return torch.cat([prefix, g], dim=1)


def checkpoint_filter_fn(state_dict: Mapping[str, Tensor | np.ndarray], cfg: ViTConfig) -> dict[str, Tensor]:
    """timm-style filter: recognise the source, convert it to our names, drop the named head-side extras,
    and resize the positional embedding to `cfg`'s grid. Idempotent on its own output."""
    sd = convert_to_timm(state_dict)
    if "pos_embed" in sd:
        sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], cfg.grid_size)
    return sd


def verify_state_dict(state_dict: Mapping[str, Tensor], expected: Mapping[str, torch.Size]) -> None:
    """Strict check before `load_state_dict`: every mismatch named in one error, not just the first."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k])}"
        for k in sorted(set(expected) & set(state_dict))
        if tuple(state_dict[k].shape) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {'; '.join(mismatched)}")
    if problems:
        raise CheckpointError("checkpoint does not fit the backbone — " + " | ".join(problems))


def matching_preset(embed_dim: int, depth: int, patch_size: int) -> tuple[str, ViTConfig] | None:
    """The preset with this width, depth and patch size (the first such, in PRESETS order), if any."""
    for name, cfg in PRESETS.items():
        if (cfg.embed_dim, cfg.depth, cfg.patch_size) == (embed_dim, depth, patch_size):
            return name, cfg
    return None


def infer_config(state_dict: Mapping[str, Tensor], **overrides: object) -> ViTConfig:
    """Architecture from converted (timm-named) weights: width, depth, patch, grid → img_size, MLP width,
    input channels, q/k/v bias. Heads are not in a fused qkv matrix: they come from `overrides`, else a
    preset of the same width/depth/patch, else a preset of the same width, else embed_dim // 64 (the
    ViT family's 64-wide heads). mean/std likewise from the matching preset unless overridden."""

    def need(key: str) -> Tensor:
        if key not in state_dict:
            raise CheckpointError(f"cannot infer the architecture: missing key {key}")
        return state_dict[key]

    w = need("patch_embed.proj.weight")  # (D, C, p, p)
    if w.ndim != 4 or w.shape[2] != w.shape[3]:
        raise CheckpointError(
            f"patch_embed.proj.weight: expected (D, C, p, p) with square p, got {tuple(w.shape)}"
        )
    embed_dim, in_chans, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    n = need("pos_embed").shape[1] - 1
    grid = math.isqrt(max(n, 0))
    if grid * grid != n or n == 0:
        raise CheckpointError(f"pos_embed: {n} patch positions (+1 CLS) is not a square grid")
    layers = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
    depth = len(layers)
    if depth == 0 or layers != set(range(depth)):
        raise CheckpointError(f"transformer blocks are not numbered 0..N-1: found {sorted(layers)}")
    hidden = int(need("blocks.0.mlp.fc1.weight").shape[0])
    mlp_ratio = hidden / embed_dim
    if int(embed_dim * mlp_ratio) != hidden:  # the model computes hidden = int(D * ratio)
        raise CheckpointError(f"MLP width {hidden} is not representable as int({embed_dim} * ratio)")

    base = ViTConfig()
    match = matching_preset(embed_dim, depth, patch)
    if match is None:
        same_width = [c for c in PRESETS.values() if c.embed_dim == embed_dim]
        base = same_width[0] if same_width else base
        num_heads = base.num_heads if same_width else max(1, embed_dim // 64)
    else:
        base, num_heads = match[1], match[1].num_heads
    kwargs: dict[str, object] = {
        "img_size": grid * patch,
        "patch_size": patch,
        "in_chans": in_chans,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": num_heads,
        "mlp_ratio": mlp_ratio,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state_dict,
        "mean": base.mean,
        "std": base.std,
    }
    kwargs.update(overrides)
    try:
        return ViTConfig(**kwargs)  # type: ignore[arg-type]
    except ValueError as e:
        raise CheckpointError(f"inferred architecture is invalid: {e}") from None
