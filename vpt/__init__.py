"""VPT core: a frozen ViT with per-sample Visual Prompt Tuning (Jia et al., ECCV 2022)."""

from vpt.config import PRESETS, ViTConfig, get_preset
from vpt.prompts import HeadBatch, PromptBatch
from vpt.vit import VisionTransformer

__all__ = ["PRESETS", "HeadBatch", "PromptBatch", "ViTConfig", "VisionTransformer", "get_preset"]
