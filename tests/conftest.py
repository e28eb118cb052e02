"""Shared fixtures: tiny random backbones (CPU) for fast tests."""

from __future__ import annotations

import pytest
import torch

from vpt import VisionTransformer, get_preset


@pytest.fixture(scope="session")
def tiny_vit() -> VisionTransformer:
    """vit_test_tiny (D=64, depth 2, 32x32 images) with fixed random weights, fp32, eval mode."""
    model = VisionTransformer(get_preset("vit_test_tiny"))
    model.init_random(torch.Generator().manual_seed(0))
    return model.eval().requires_grad_(False)
