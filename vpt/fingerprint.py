"""Backbone fingerprint: a stable hash of the frozen weights a prompt was trained against.

A VPT task is only meaningful on the exact backbone it was trained with (Jia et al., ECCV 2022,
arXiv 2203.12119: prompts are learned against *frozen* weights), so every task artifact records this
fingerprint and the server refuses a task whose fingerprint differs from the resident backbone's
(DESIGN.md, "The task artifact").

Algorithm "v1" (documented in docs/backbones.md; change it only by adding "v2", never in place):

    h = sha256(b"vpt-backbone-fingerprint/v1\\0")
    for name in sorted(state_dict):                       # timm parameter names, Unicode code-point order
        t = state_dict[name]
        h.update(f"{name}\\0{','.join(map(str, t.shape))}\\0".encode("utf-8"))
        h.update(t as little-endian float32, C order)     # bf16/fp16 widen exactly, so no rounding
    fingerprint = "v1:" + h.hexdigest()

The input is the *converted* (timm-named) state dict after any positional-embedding resize and before
the cast to the run dtype, so the same weights shipped as timm .safetensors, .pth, a Hugging Face
directory or Google's .npz give the same fingerprint, and so does any run dtype.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

FINGERPRINT_VERSION = "v1"
# Domain separation: a v1 digest can never collide with a hash of the same bytes made for another purpose.
_DOMAIN = b"vpt-backbone-fingerprint/v1\0"
# Elements converted to float32 per step: bounds the extra memory to 16 MiB for any tensor size (ViT-H's
# largest matrix is 6.5M elements, a GPU-resident one would otherwise be copied to the host whole).
_CHUNK = 1 << 22


def _update_with_tensor(h: hashlib._Hash, t: torch.Tensor) -> None:
    flat = t.detach().reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start : start + _CHUNK].to(device="cpu", dtype=torch.float32).contiguous()
        # '<f4' makes the byte order explicit; on little-endian hosts astype(copy=False) is free.
        h.update(memoryview(chunk.numpy().astype("<f4", copy=False)).cast("B"))


def backbone_fingerprint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Hex sha256 over timm-named backbone weights, prefixed with the algorithm version ("v1:...").

    Args:
        state_dict: the frozen backbone's converted weights (e.g. `model.state_dict()` of a
            `VisionTransformer`, or the output of `vpt.checkpoint.checkpoint_filter_fn`). Only floating
            point tensors are accepted: every backbone parameter is one.
    """
    if not state_dict:
        raise ValueError("cannot fingerprint an empty state dict")
    h = hashlib.sha256(_DOMAIN)
    for name in sorted(state_dict):
        t = state_dict[name]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"fingerprint input {name!r} must be a floating point tensor, got {type(t)}")
        shape = ",".join(str(d) for d in t.shape)
        h.update(f"{name}\0{shape}\0".encode())
        _update_with_tensor(h, t)
    return f"{FINGERPRINT_VERSION}:{h.hexdigest()}"
