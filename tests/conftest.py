"""Shared fixtures: tiny random backbones (CPU) for fast tests; a real S3-protocol server (moto)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from tests.moto_s3 import moto_server
from vpt import VisionTransformer, get_preset


@pytest.fixture(scope="session")
def tiny_vit() -> VisionTransformer:
    """vit_test_tiny (D=64, depth 2, 32x32 images) with fixed random weights, fp32, eval mode."""
    model = VisionTransformer(get_preset("vit_test_tiny"))
    model.init_random(torch.Generator().manual_seed(0))
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a moto S3 server on 127.0.0.1 (random free port), alive for the whole session."""
    with moto_server(tmp_path_factory.mktemp("moto") / "server.log") as (_, endpoint):
        yield endpoint
