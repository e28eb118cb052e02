"""Transformer building blocks with timm's parameter names.

References: timm `timm/models/vision_transformer.py` and `timm/layers/attention.py` (parameter names,
pre-norm block), dinov2 `dinov2/layers/` (one small module per idea). Names matter: a timm state dict
loads into these modules as it is (`patch_embed.proj`, `blocks.N.attn.qkv`, `blocks.N.mlp.fc1`, ...).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vpt.config import ViTConfig

# Keys and values (B, T, 2D) of a block's tokens → the keys and values its attention uses (B, P + T, 2D).
Prefix = Callable[[Tensor], Tensor]


class PatchEmbed(nn.Module):
    """Image → non-overlapping patch tokens via a strided convolution (ViT, Dosovitskiy et al.)."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


class Attention(nn.Module):
    """Multi-head self-attention through `F.scaled_dot_product_attention`.

    `key_mask` (B, T) bool, True = may be attended to. It is how samples with different prompt lengths
    share one batch: padded prompt positions are hidden as keys, so every real token sees exactly the
    keys of its solo run. With no mask, SDPA can pick its fused (flash / memory-efficient) kernels.
    """

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.embed_dim, cfg.embed_dim * 3, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def forward(
        self,
        x: Tensor,
        key_mask: Tensor | None = None,
        prefix: Prefix | None = None,
        queries: int | None = None,
    ) -> Tensor:
        """`prefix(kv)`: the keys and values to attend over (B, P + T, 2D), given the tokens' own
        (B, T, 2D) — P more before them (the mask then covers P + T keys): how a VPT-deep task's
        prompts enter at inference (`vpt.prompts.PromptKV.extend`). `queries`: outputs for the first
        `queries` tokens only (B, queries, D), still attending over every key."""
        B, T, D = x.shape
        qkv = self.qkv(x)  # (B, T, 3D): per token q, k, v
        kv = qkv[..., D:] if prefix is None else prefix(qkv[..., D:])  # (B, [P +] T, 2D): per token k, v
        Q = T if queries is None else queries
        q = qkv[:, :Q, :D].unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # (B, nh, Q, hd)
        k, v = kv.unflatten(-1, (2, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, keys)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, nh, Q, hd)
        return self.proj(x.transpose(1, 2).reshape(B, Q, D))

    def kv(self, x: Tensor) -> Tensor:
        """Keys and values only of tokens x (..., T, D) → (..., T, 2D), the layout of `qkv`'s output
        without its query part (timm's qkv weight stacks q, k, v along the output dimension)."""
        D = x.shape[-1]
        bias = None if self.qkv.bias is None else self.qkv.bias[D:]
        return F.linear(x, self.qkv.weight[D:], bias)


class Mlp(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        hidden = int(cfg.embed_dim * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, cfg.embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        # Exact (erf) GELU, as in timm, HF ViT and the original JAX ViT.
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: two residual lines."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg)

    def forward(
        self,
        x: Tensor,
        key_mask: Tensor | None = None,
        prefix: Prefix | None = None,
        queries: int | None = None,
    ) -> Tensor:
        """`queries`: the block's outputs for the first `queries` tokens only (B, queries, D) — every
        op but attention is per token, and attention still reads every token's key and value."""
        h = self.attn(self.norm1(x), key_mask, prefix, queries)
        x = (x if queries is None else x[:, :queries]) + h
        return x + self.mlp(self.norm2(x))


def prompt_key_mask(lengths: Tensor, max_len: int, num_patches: int) -> Tensor:
    """(B, 1 + max_len + N) bool key mask for the sequence `[CLS, prompts (padded to max_len), patches]`:
    sample b may attend to CLS, its first `lengths[b]` prompt slots and all patches."""
    ones = torch.ones(lengths.shape[0], 1, dtype=torch.bool, device=lengths.device)
    return torch.cat([ones, length_mask(lengths, max_len), ones.expand(-1, num_patches)], dim=1)


def length_mask(lengths: Tensor, max_len: int) -> Tensor:
    """(B, max_len) bool: True at each sample's first `lengths[b]` positions (its real prompts)."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]
