"""Our backbone against an independent implementation: Hugging Face transformers' `ViTModel`.

The same random weights in both models (converted by `vpt.checkpoint`, or written by our test writer and
read by `ViTModel.from_pretrained`) must give the same final normed hidden states, to 1e-5 relative error
in fp32. Configurations differ in depth, width, heads, patch, MLP ratio, q/k/v bias, LayerNorm epsilon and
attention implementation (eager / sdpa), so a transposed kernel, a swapped q/k/v block or an ignored
epsilon shows up as a failure here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from tests.vpt import ckpt_writers
from vpt import VisionTransformer
from vpt.checkpoint import checkpoint_filter_fn, convert_to_timm, infer_config
from vpt.hub import load_backbone

REL_TOL = 1e-5

CONFIGS = {
    # name: HF ViTConfig kwargs
    "d64-L2-h4-p8-eps1e-12-eager": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        image_size=32, patch_size=8, layer_norm_eps=1e-12, attn_implementation="eager",
    ),
    "d96-L3-h6-p4-mlp2x-eps1e-6-sdpa": dict(
        hidden_size=96, num_hidden_layers=3, num_attention_heads=6, intermediate_size=192,
        image_size=24, patch_size=4, layer_norm_eps=1e-6, attn_implementation="sdpa",
    ),
    "d48-L2-h3-p4-noqkvbias-eps1e-5-sdpa": dict(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=192,
        image_size=16, patch_size=4, layer_norm_eps=1e-5, qkv_bias=False, attn_implementation="sdpa",
    ),
}  # fmt: skip


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights far from any init pattern (LayerNorm scales ≠ 1, biases ≠ 0, large embeddings), so every
    parameter's placement affects the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "embeddings" in name and "projection" not in name:  # cls token, position embeddings
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def hf_model(name: str, cls: type = transformers.ViTModel, **kw: object) -> torch.nn.Module:
    config = transformers.ViTConfig(**CONFIGS[name])
    model = cls(config, add_pooling_layer=False) if cls is transformers.ViTModel else cls(config, **kw)
    return randomize_(model, seed=len(name))


def images(name: str, batch: int = 3) -> torch.Tensor:
    s = CONFIGS[name]["image_size"]
    return torch.randn(batch, 3, s, s, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_saved_model_loads_with_parity(name: str, tmp_path: Path) -> None:
    """HF writes the checkpoint (save_pretrained, on-disk names), we load the directory."""
    hf = hf_model(name)
    hf.save_pretrained(tmp_path)
    bb = load_backbone(str(tmp_path))
    assert bb.cfg.layer_norm_eps == CONFIGS[name]["layer_norm_eps"]
    assert bb.cfg.num_heads == CONFIGS[name]["num_attention_heads"]
    x = images(name)
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state
        ours = bb.model.forward_features(x)
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) <= REL_TOL
    assert rel_err(bb.model(x), ref[:, 0]) <= REL_TOL  # the CLS feature VPT's head reads


def test_hf_classification_model_drops_head_and_pooler(tmp_path: Path) -> None:
    """ViTForImageClassification: `vit.` prefix stripped, `classifier.*` dropped (a named case)."""
    name = "d96-L3-h6-p4-mlp2x-eps1e-6-sdpa"
    hf = hf_model(name, transformers.ViTForImageClassification)
    hf.save_pretrained(tmp_path)
    bb = load_backbone(str(tmp_path))
    x = images(name)
    with torch.no_grad():
        ref = hf.vit(pixel_values=x).last_hidden_state
    assert rel_err(bb.model.forward_features(x), ref) <= REL_TOL


def test_transformers_in_memory_names_convert(tmp_path: Path) -> None:
    """transformers >= 5 renames modules in memory (layers.N.attention.q_proj, mlp.fc1, ...):
    `checkpoint_filter_fn` takes that state dict directly too."""
    name = "d64-L2-h4-p8-eps1e-12-eager"
    hf = hf_model(name)
    assert any(".q_proj." in k for k in hf.state_dict())  # really the renamed in-memory layout
    cfg = infer_config(convert_to_timm(hf.state_dict()), num_heads=4, layer_norm_eps=1e-12)
    sd = checkpoint_filter_fn(hf.state_dict(), cfg)
    model = VisionTransformer(cfg).eval()
    model.load_state_dict(sd, strict=True)
    x = images(name)
    with torch.no_grad():
        assert rel_err(model.forward_features(x), hf(pixel_values=x).last_hidden_state) <= REL_TOL


def test_our_hf_writer_is_read_by_transformers(tiny_vit: VisionTransformer, tmp_path: Path) -> None:
    """The reverse direction: our weights, written by the test writer in HF layout, loaded by
    `ViTModel.from_pretrained`. Also validates the writer the format-equivalence tests rely on."""
    ckpt_writers.write_hf_dir(tmp_path, tiny_vit.state_dict(), tiny_vit.cfg)
    hf = transformers.ViTModel.from_pretrained(tmp_path, add_pooling_layer=False, attn_implementation="eager")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_err(tiny_vit.forward_features(x), hf.eval()(pixel_values=x).last_hidden_state) <= REL_TOL
