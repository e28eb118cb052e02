"""Backbone configuration and presets.

Preset names follow timm (`timm/models/vision_transformer.py`) so a checkpoint named like
`vit_base_patch16_224` maps onto the same architecture here. The VPT paper (Jia et al., ECCV 2022,
arXiv 2203.12119) uses ViT-B/16 pretrained on ImageNet-21k; ViT-L/16 and ViT-H/14 appear in its
scaling study.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Google's original ViT checkpoints (and timm's augreg / in21k weights) normalise to [-1, 1].
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of a plain (pre-norm, CLS-token) Vision Transformer."""

    img_size: int = 224  # square input side the positional embedding is laid out for
    patch_size: int = 16  # side of each square patch
    in_chans: int = 3  # image channels
    embed_dim: int = 768  # D, the token width (and the width of every prompt token)
    depth: int = 12  # L, number of transformer blocks (a VPT-deep task has L prompt sets)
    num_heads: int = 12  # attention heads; embed_dim must be divisible by it
    mlp_ratio: float = 4.0  # hidden width of each MLP = mlp_ratio * embed_dim
    qkv_bias: bool = True  # timm and HF ViTs both use biased q/k/v projections
    layer_norm_eps: float = 1e-6  # timm/Google use 1e-6; HF configs often say 1e-12
    mean: tuple[float, float, float] = IMAGENET_MEAN  # per-channel normalisation of [0, 1] pixels
    std: tuple[float, float, float] = IMAGENET_STD
    # Eval transform (DESIGN/issue C): resize the shorter side to this, then centre-crop img_size.
    # 256 for 224 is the VPT paper's (and torchvision's) evaluation recipe.
    resize_size: int = field(default=0)

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if not self.resize_size:
            # object.__setattr__ because the dataclass is frozen; 256/224 ratio as in the paper.
            object.__setattr__(self, "resize_size", round(self.img_size * 256 / 224))

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def prompt_init_bound(self) -> float:
        """VPT's prompt init bound v = sqrt(6 / (3 * patch^2 + D)) (Xavier uniform over the patch
        projection's fan-in + fan-out; 0.0625 for B/16)."""
        return (6.0 / (3 * self.patch_size**2 + self.embed_dim)) ** 0.5

    def replace(self, **changes: object) -> ViTConfig:
        changes.setdefault("resize_size", 0)  # recompute unless given explicitly
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, object]:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


PRESETS: dict[str, ViTConfig] = {
    "vit_tiny_patch16_224": ViTConfig(embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16_224": ViTConfig(embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": ViTConfig(embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16_224": ViTConfig(embed_dim=1024, depth=24, num_heads=16),
    "vit_huge_patch14_224": ViTConfig(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    # Small presets for tests, demos and CPU benchmarks (random weights only).
    "vit_test_tiny": ViTConfig(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4),
    "vit_test_small": ViTConfig(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=4),
    "vit_test_digits": ViTConfig(img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4),
}


def get_preset(name: str) -> ViTConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown backbone preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
