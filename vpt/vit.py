"""Vision Transformer with per-sample Visual Prompt Tuning.

VPT semantics (Jia et al., ECCV 2022, arXiv 2203.12119, Sec. 3.2; official code KMnP/vpt
`src/models/vit_prompt/vit.py`):
- tokens: patch_embed(image) → prepend CLS → add the positional embedding → **then** insert the prompts
  right after CLS: `[CLS, p_1..p_P, patch_1..patch_N]`; prompts get no positional embedding;
- VPT-shallow: prompts enter before layer 0 only, their outputs flow on through the later layers;
- VPT-deep: before every layer i >= 1 the previous layer's outputs at the prompt positions are discarded
  and replaced by prompt set i;
- final LayerNorm over the sequence; the head reads the CLS token.
The architecture and parameter names follow timm's `VisionTransformer` (pre-norm, class token).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn

from vpt.config import ViTConfig
from vpt.layers import Block, PatchEmbed, length_mask, prompt_key_mask
from vpt.prompts import HeadBatch, PromptBatch, PromptKV


class VisionTransformer(nn.Module):
    """Frozen backbone. `forward_features` returns the normed token sequence; `pool` the CLS feature."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.num_patches, cfg.embed_dim))
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self._norm_cache: dict[tuple[object, ...], tuple[Tensor, Tensor]] = {}  # see _norm_constants

    def init_random(self, generator: torch.Generator | None = None) -> VisionTransformer:
        """timm-like random init (trunc-normal std 0.02) — for tests and `random:` backbones only."""
        for name, p in self.named_parameters():
            if p.ndim == 1 and name.endswith(".weight"):  # LayerNorm scale
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.normal_(p, std=0.02, generator=generator)
            else:
                # normal + clamp at 2 std: trunc_normal_ with a generator is ~100x slower on CPU
                # (36 s for ViT-B), and random backbones only need to be deterministic.
                with torch.no_grad():
                    p.normal_(std=0.02, generator=generator).clamp_(-0.04, 0.04)
        return self

    def embed(self, x: Tensor) -> Tensor:
        """images (B, 3, H, W), normalised → (B, 1 + N, D) tokens with positional embedding."""
        x = self.patch_embed(x)  # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        return torch.cat([cls, x], dim=1) + self.pos_embed

    def forward_features(
        self,
        x: Tensor,
        prompts: PromptBatch | None = None,
        between_blocks: Callable[[], None] | None = None,
        kv: PromptKV | None = None,
        cls_only: bool = False,
    ) -> Tensor:
        """images (B, 3, H, W) → (B, 1 + P + N, D) after the final norm; P = prompts.max_len (0 without
        token prompts; (B, 1, D) with `cls_only`).

        `prompts`: prompt tokens inserted after CLS (VPT-shallow; VPT-deep replaced before every layer:
        the reference algorithm, and training's path). `kv`: VPT-deep prompts as each layer's keys and
        values instead (`PromptKV`, inference): image tokens attend to them first, and no prompt
        position is computed — CLS and the patches get exactly what the token path gives them. A
        sample uses one or the other (its length 0 in the one it does not use); a batch may hold both.
        `between_blocks()` is called after every block but the last: a serving scheduler's point to
        run other work before this batch continues (it must not touch this batch's tensors).
        `cls_only`: the last block computes its output at CLS only, the one position a classifier reads
        (B, 1, D) — the same numbers there, without the patch tokens' last attention and MLP rows."""
        x = self.embed(x)
        B, T = x.shape[0], x.shape[1]  # T = 1 + N
        if prompts is not None and not prompts.max_len:
            prompts = None
        if kv is not None and not kv.max_len:
            kv = None
        P = 0 if prompts is None else prompts.max_len
        key_mask = None  # over [kv, CLS, prompts, patches]
        if prompts is not None:
            if not prompts.uniform:
                key_mask = prompt_key_mask(prompts.lengths, P, T - 1)
            x = torch.cat([x[:, :1], prompts.layer(0).to(x.dtype), x[:, 1:]], dim=1)  # (B, 1 + P + N, D)
        if kv is not None and (not kv.uniform or key_mask is not None):
            own = key_mask if key_mask is not None else x.new_ones(B, x.shape[1], dtype=torch.bool)
            key_mask = torch.cat([length_mask(kv.lengths, kv.max_len), own], dim=1)
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            if prompts is not None and i > 0 and prompts.any_deep:
                new = prompts.layer(i).to(x.dtype)  # (B, P, D)
                if not prompts.all_deep:
                    # Shallow samples keep the previous layer's outputs at their prompt positions.
                    new = torch.where(prompts.deep[:, None, None], new, x[:, 1 : 1 + P])
                x = torch.cat([x[:, :1], new, x[:, 1 + P :]], dim=1)
            prefix = None if kv is None else partial(kv.extend, i)
            x = blk(x, key_mask, prefix, 1 if cls_only and i == last else None)
            if between_blocks is not None and i < last:
                between_blocks()
        return self.norm(x)

    def prompt_kv(self, prompts: Tensor) -> Tensor:
        """A VPT-deep task's prompts (L, P, D) → the keys and values they give each layer, (L, P, 2D):
        layer i's are `qkv_i(LN1_i(prompts[i]))` without the query part — all the
        image tokens ever see of deep prompts (`PromptKV`). Made once per task, in the model's dtype."""
        if prompts.shape[0] != len(self.blocks):
            raise ValueError(f"deep prompts need {len(self.blocks)} layers, not {prompts.shape[0]}")
        prompts = prompts.to(self.pos_embed.dtype)
        return torch.stack([blk.attn.kv(blk.norm1(p)) for blk, p in zip(self.blocks, prompts, strict=True)])

    @staticmethod
    def pool(tokens: Tensor) -> Tensor:
        """CLS feature (B, D): what VPT's head reads."""
        return tokens[:, 0]

    def forward(
        self, x: Tensor, prompts: PromptBatch | None = None, heads: HeadBatch | None = None
    ) -> Tensor:
        """Features (B, D), or logits (B, C) when heads are given."""
        feats = self.pool(self.forward_features(x, prompts))
        return feats if heads is None else heads(feats)

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 (B, 3, H, W) → float normalised with the backbone's mean/std, in the model's dtype."""
        dtype = self.pos_embed.dtype
        mean, std = self._norm_constants(images.device)
        return ((images.float() - mean) / std).to(dtype)

    def _norm_constants(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(1, 3, 1, 1) float32 mean and std in 0-255 units on `device`, made once: creating them from
        Python floats on a GPU is a blocking copy that would wait for all queued work, every batch."""
        key = (device, self.cfg.mean, self.cfg.std)
        cached = self._norm_cache.get(key)
        if cached is None:
            mean = torch.tensor(self.cfg.mean, dtype=torch.float32).view(1, 3, 1, 1).mul(255).to(device)
            std = torch.tensor(self.cfg.std, dtype=torch.float32).view(1, 3, 1, 1).mul(255).to(device)
            cached = self._norm_cache[key] = (mean, std)
        return cached
