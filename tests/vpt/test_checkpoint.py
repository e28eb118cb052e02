"""Checkpoint formats, strict loading and positional-embedding resize (vpt.checkpoint, vpt.hub).

One set of tiny random weights is written in every supported format by `ckpt_writers` (the inverse
converters); each must load to the same fingerprint and bit-identical outputs. Error paths must name the
key, shape or file at fault.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from tests.vpt import ckpt_writers as W
from vpt import VisionTransformer, get_preset
from vpt.checkpoint import (
    CheckpointError,
    checkpoint_filter_fn,
    convert_to_timm,
    detect_format,
    infer_config,
    resample_pos_embed,
    verify_state_dict,
)
from vpt.config import IMAGENET_MEAN, IMAGENET_STD, INCEPTION_MEAN, INCEPTION_STD
from vpt.fingerprint import backbone_fingerprint
from vpt.hub import load_backbone

ARCH_FIELDS = (
    "img_size",
    "patch_size",
    "in_chans",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "qkv_bias",
)


@pytest.fixture(scope="module")
def sd(tiny_vit: VisionTransformer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tiny_vit.state_dict().items()}


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


# Each writer: (tmp_path, state dict, cfg) → the path to hand to load_backbone.
WRITERS: dict[str, Callable[[Path, dict, object], Path]] = {
    "timm.safetensors": lambda d, sd, cfg: W.write_timm_safetensors(d / "w.safetensors", sd),
    "timm.safetensors+head": lambda d, sd, cfg: W.write_timm_safetensors(
        d / "w.safetensors", sd, extra={"head.weight": torch.zeros(5, 64), "head.bias": torch.zeros(5)}
    ),
    "timm.pth": lambda d, sd, cfg: W.write_timm_pth(d / "w.pth", sd),
    "timm.pth{state_dict}": lambda d, sd, cfg: W.write_timm_pth(d / "w.pth", sd, "state_dict", epoch=3),
    "timm.bin{model}": lambda d, sd, cfg: W.write_timm_pth(d / "w.bin", sd, "model"),
    "ddp module.": lambda d, sd, cfg: W.write_timm_pth(
        d / "w.pth", {"module." + k: v for k, v in sd.items()}
    ),
    "hf dir (ViTModel)": lambda d, sd, cfg: W.write_hf_dir(d / "hf", sd, cfg),
    "hf dir (ForImageClassification)": lambda d, sd, cfg: W.write_hf_dir(d / "hf", sd, cfg, classifier=7),
    "hf bare safetensors": lambda d, sd, cfg: W.write_timm_safetensors(
        d / "hf.safetensors", W.timm_to_hf(sd, cfg)
    ),
    "npz MlpBlock_3": lambda d, sd, cfg: W.write_npz(d / "w.npz", sd, cfg),
    "npz MlpBlock_1": lambda d, sd, cfg: W.write_npz(d / "w.npz", sd, cfg, mlp_scope="MlpBlock_1"),
    "timm hub dir": lambda d, sd, cfg: W.write_timm_dir(d / "timm", sd, cfg, "vit_test_tiny"),
}


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_every_format_loads_to_same_fingerprint_and_outputs(
    fmt: str, tiny_vit: VisionTransformer, sd: dict, x: torch.Tensor, tmp_path: Path
) -> None:
    path = WRITERS[fmt](tmp_path, sd, tiny_vit.cfg)
    bb = load_backbone(str(path))
    assert bb.fingerprint == backbone_fingerprint(sd)
    for f in ARCH_FIELDS:
        assert getattr(bb.cfg, f) == getattr(tiny_vit.cfg, f), f
    assert not bb.model.training and not any(p.requires_grad for p in bb.model.parameters())
    assert bb.spec == str(path)
    with torch.no_grad():
        if fmt != "hf bare safetensors":  # a bare HF file gets transformers' default eps (1e-12)
            assert torch.equal(bb.model.forward_features(x), tiny_vit.forward_features(x))


def test_sharded_safetensors_index(
    tiny_vit: VisionTransformer, sd: dict, x: torch.Tensor, tmp_path: Path
) -> None:
    names = sorted(sd)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k].contiguous() for k in part}, str(tmp_path / fname))
        weight_map.update(dict.fromkeys(part, fname))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    bb = load_backbone(str(tmp_path))
    assert bb.fingerprint == backbone_fingerprint(sd)


def test_backbone_ids(tiny_vit: VisionTransformer, sd: dict, tmp_path: Path) -> None:
    assert load_backbone(str(WRITERS["timm hub dir"](tmp_path, sd, tiny_vit.cfg))).backbone_id == (
        "vit_test_tiny.test_tag"
    )
    assert load_backbone(
        str(W.write_npz(tmp_path / "imagenet21k_ViT-T.npz", sd, tiny_vit.cfg))
    ).backbone_id == ("imagenet21k_ViT-T.npz")


# ------------------------------------------------------------------------------ config and normalisation
def test_hf_dir_honours_layer_norm_eps(tiny_vit: VisionTransformer, sd: dict, tmp_path: Path) -> None:
    bb = load_backbone(str(W.write_hf_dir(tmp_path, sd, tiny_vit.cfg, layer_norm_eps=1e-12)))
    assert bb.cfg.layer_norm_eps == 1e-12
    norms = [m for m in bb.model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * tiny_vit.cfg.depth + 1 and all(m.eps == 1e-12 for m in norms)


def test_normalisation_per_source(tiny_vit: VisionTransformer, sd: dict, tmp_path: Path) -> None:
    cfg = tiny_vit.cfg
    custom = ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    with_pre = load_backbone(str(W.write_hf_dir(tmp_path / "a", sd, cfg, mean_std=custom)))
    assert (with_pre.cfg.mean, with_pre.cfg.std) == custom  # preprocessor_config.json
    no_pre = load_backbone(str(W.write_hf_dir(tmp_path / "b", sd, cfg)))
    assert (no_pre.cfg.mean, no_pre.cfg.std) == (INCEPTION_MEAN, INCEPTION_STD)  # ViTImageProcessor default
    npz = load_backbone(str(W.write_npz(tmp_path / "c.npz", sd, cfg)))
    assert (npz.cfg.mean, npz.cfg.std) == (IMAGENET_MEAN, IMAGENET_STD)  # the VPT official code's choice
    timm_cfg = cfg.replace(mean=INCEPTION_MEAN, std=INCEPTION_STD)
    timm = load_backbone(str(W.write_timm_dir(tmp_path / "d", sd, timm_cfg, "vit_test_tiny")))
    assert (timm.cfg.mean, timm.cfg.std) == (INCEPTION_MEAN, INCEPTION_STD)  # pretrained_cfg


def test_npz_heads_come_from_the_kernel_shape(sd: dict, tmp_path: Path) -> None:
    """D=64 with 2 heads is in no preset: only the npz's (D, heads, head_dim) kernels can say so."""
    cfg = get_preset("vit_test_tiny").replace(num_heads=2)
    model = VisionTransformer(cfg).init_random(torch.Generator().manual_seed(5)).eval()
    bb = load_backbone(str(W.write_npz(tmp_path / "h2.npz", model.state_dict(), cfg)))
    assert bb.cfg.num_heads == 2
    xx = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(bb.model.forward_features(xx), model.forward_features(xx))


def test_infer_config_heads_rule(sd: dict) -> None:
    assert infer_config(sd).num_heads == 4  # vit_test_tiny preset (64 // 64 would be 1)
    wide = VisionTransformer(get_preset("vit_test_tiny").replace(embed_dim=256, num_heads=8)).state_dict()
    assert infer_config(wide).num_heads == 4  # no preset of width 256: embed_dim // 64
    assert infer_config(wide, num_heads=8).num_heads == 8
    small = VisionTransformer(get_preset("vit_test_small")).state_dict()
    inferred = infer_config(small)
    assert all(getattr(inferred, f) == getattr(get_preset("vit_test_small"), f) for f in ARCH_FIELDS)


def test_hf_config_disagreeing_with_weights_is_refused(
    tiny_vit: VisionTransformer, sd: dict, tmp_path: Path
) -> None:
    d = W.write_hf_dir(tmp_path, sd, tiny_vit.cfg)
    conf = json.loads((d / "config.json").read_text())
    conf["image_size"] = 64  # pos_embed is laid out for 32: must not be "fixed" by silent resizing
    (d / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match=r"img_size: config 64 vs weights 32"):
        load_backbone(str(d))


def test_unsupported_timm_options_are_refused(tiny_vit: VisionTransformer, sd: dict, tmp_path: Path) -> None:
    d = W.write_timm_dir(tmp_path, sd, tiny_vit.cfg, "vit_test_tiny", model_args={"global_pool": "avg"})
    with pytest.raises(CheckpointError, match="global_pool='avg'"):
        load_backbone(str(d))


# ------------------------------------------------------------------------------ converters
def test_named_drops_and_idempotence(sd: dict) -> None:
    cfg = get_preset("vit_test_tiny")
    timm_extra = {**sd, "head.weight": torch.zeros(3, 64), "pre_logits.fc.weight": torch.zeros(64, 64)}
    assert set(checkpoint_filter_fn(timm_extra, cfg)) == set(sd)
    hf_extra = {
        **W.timm_to_hf(sd, cfg),
        "pooler.dense.weight": torch.zeros(64, 64),
        "classifier.bias": torch.zeros(3),
    }
    assert set(checkpoint_filter_fn(hf_extra, cfg)) == set(sd)
    once = checkpoint_filter_fn(W.timm_to_npz(sd, cfg), cfg)
    twice = checkpoint_filter_fn(once, cfg)
    assert set(once) == set(sd) and all(
        torch.equal(once[k], twice[k]) and torch.equal(once[k], sd[k]) for k in sd
    )


def test_average_pool_timm_model_is_refused(sd: dict) -> None:
    avg = {k: v for k, v in sd.items() if not k.startswith("norm.")}
    avg |= {"fc_norm.weight": sd["norm.weight"], "fc_norm.bias": sd["norm.bias"]}
    with pytest.raises(CheckpointError, match="fc_norm"):
        convert_to_timm(avg)


def test_unrecognised_keys_are_named() -> None:
    with pytest.raises(CheckpointError, match=r"unrecognised checkpoint.*bert\.embeddings"):
        detect_format({"bert.embeddings.word_embeddings.weight": torch.zeros(2)})


# ------------------------------------------------------------------------------ strict loading
def test_strict_loading_names_missing_key(sd: dict, tmp_path: Path) -> None:
    broken = {k: v for k, v in sd.items() if k != "blocks.1.norm2.bias"}
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.1\.norm2\.bias"):
        load_backbone(str(W.write_timm_safetensors(tmp_path / "m.safetensors", broken)))


def test_strict_loading_names_unexpected_key(sd: dict, tmp_path: Path) -> None:
    extra = {**sd, "blocks.0.ls1.gamma": torch.ones(64)}  # layer scale: not our architecture
    with pytest.raises(CheckpointError, match=r"unexpected keys: blocks\.0\.ls1\.gamma"):
        load_backbone(str(W.write_timm_safetensors(tmp_path / "u.safetensors", extra)))


def test_strict_loading_names_shape_mismatch(sd: dict, tmp_path: Path) -> None:
    bad = {**sd, "blocks.1.mlp.fc2.weight": torch.zeros(64, 128)}
    with pytest.raises(
        CheckpointError, match=r"blocks\.1\.mlp\.fc2\.weight: checkpoint \(64, 128\) vs model \(64, 256\)"
    ):
        load_backbone(str(W.write_timm_safetensors(tmp_path / "s.safetensors", bad)))


def test_unknown_hf_and_npz_keys_keep_their_source_names(sd: dict, tmp_path: Path) -> None:
    cfg = get_preset("vit_test_tiny")
    hf = {**W.timm_to_hf(sd, cfg), "encoder.layer.0.attention.attention.rotary.weight": torch.zeros(4)}
    with pytest.raises(
        CheckpointError, match=r"unexpected keys: encoder\.layer\.0\.attention\.attention\.rotary"
    ):
        load_backbone(str(W.write_timm_safetensors(tmp_path / "hf.safetensors", hf)))
    npz = W.timm_to_npz(sd, cfg)
    del npz["Transformer/encoderblock_1/MultiHeadDotProductAttention_1/out/bias"]
    np.savez(tmp_path / "m.npz", **npz)
    with pytest.raises(CheckpointError, match=r"encoderblock_1/MultiHeadDotProductAttention_1/out/bias"):
        load_backbone(str(tmp_path / "m.npz"))


def test_verify_state_dict_reports_everything_at_once(sd: dict) -> None:
    expected = {k: v.shape for k, v in sd.items()}
    got = {k: v for k, v in sd.items() if k != "norm.bias"} | {
        "extra": torch.zeros(1),
        "cls_token": torch.zeros(2),
    }
    with pytest.raises(CheckpointError) as e:
        verify_state_dict(got, expected)
    assert "missing keys: norm.bias" in str(e.value)
    assert "unexpected keys: extra" in str(e.value)
    assert "cls_token: checkpoint (2,) vs model (1, 1, 64)" in str(e.value)


# ------------------------------------------------------------------------------ refusing unsafe / non checkpoints
class _Payload:
    """Pickles to a call of builtins.open: loading it unsafely would create the sentinel file."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple:
        return (open, (str(self.sentinel), "w"))


def test_pth_with_pickled_objects_is_refused(sd: dict, tmp_path: Path) -> None:
    path = W.write_timm_pth(tmp_path / "ns.pth", sd, "state_dict", args=argparse.Namespace(lr=0.1))
    with pytest.raises(CheckpointError, match=r"refused.*argparse\.Namespace"):
        load_backbone(str(path))
    sentinel = tmp_path / "pwned"
    torch.save({"state_dict": sd, "x": _Payload(sentinel)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused"):
        load_backbone(str(tmp_path / "evil.pth"))
    assert not sentinel.exists()


def test_npz_with_object_arrays_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "o.npz", cls=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CheckpointError, match=r"o\.npz: refused"):
        load_backbone(str(tmp_path / "o.npz"))


@pytest.mark.parametrize("name", ["junk.safetensors", "junk.pth", "junk.bin", "junk.npz", "junk.txt"])
def test_not_a_checkpoint_file(name: str, tmp_path: Path) -> None:
    (tmp_path / name).write_bytes(b"this is not a checkpoint\n" * 4)
    with pytest.raises(CheckpointError, match=re.escape(name) + ": (not a|unsupported|refused)"):
        load_backbone(str(tmp_path / name))


def test_not_a_backbone(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file or directory"):
        load_backbone(str(tmp_path / "missing.safetensors"))
    save_file({"bert.pooler.dense.weight": torch.zeros(2, 2)}, str(tmp_path / "bert.safetensors"))
    with pytest.raises(CheckpointError, match="unrecognised checkpoint"):
        load_backbone(str(tmp_path / "bert.safetensors"))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="model_type 'vit', got 'bert'"):
        load_backbone(str(tmp_path / "d"))
    (tmp_path / "e").mkdir()
    with pytest.raises(CheckpointError, match=r"cannot tell which weights file.*none"):
        load_backbone(str(tmp_path / "e"))


# ------------------------------------------------------------------------------ positional embedding resize
def test_resize_is_identity_when_sizes_match(sd: dict, tmp_path: Path) -> None:
    assert resample_pos_embed(sd["pos_embed"], 4) is sd["pos_embed"]
    path = W.write_timm_safetensors(tmp_path / "w.safetensors", sd)
    assert load_backbone(str(path), img_size=32).fingerprint == backbone_fingerprint(sd)


@pytest.mark.parametrize("img_size", [48, 16])
def test_load_at_another_image_size(img_size: int, sd: dict, tmp_path: Path) -> None:
    bb = load_backbone(str(W.write_timm_safetensors(tmp_path / "w.safetensors", sd)), img_size=img_size)
    grid = img_size // 8
    assert bb.cfg.img_size == img_size and bb.cfg.resize_size == round(img_size * 256 / 224)
    assert bb.model.pos_embed.shape == (1, 1 + grid * grid, 64)
    assert torch.equal(bb.model.pos_embed[:, 0], sd["pos_embed"][:, 0])  # CLS position kept as is
    assert bb.fingerprint != backbone_fingerprint(sd)  # computed after the resize: it is another backbone
    with torch.no_grad():
        feats = bb.model.forward_features(torch.randn(2, 3, img_size, img_size))
    assert feats.shape == (2, 1 + grid * grid, 64) and torch.isfinite(feats).all()


def test_img_size_not_a_multiple_of_patch(sd: dict, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"img_size=50.*multiple of patch_size 8"):
        load_backbone(str(W.write_timm_safetensors(tmp_path / "w.safetensors", sd)), img_size=50)


def test_resize_matches_pil_bicubic(sd: dict) -> None:
    """Independent reference: PIL's bicubic on each channel of the 4x4 grid (what torch's antialiased
    bicubic, and so timm's resample, reproduce)."""
    pe = sd["pos_embed"]  # (1, 17, 64)
    grid = pe[0, 1:].reshape(4, 4, 64).numpy()
    for new in (7, 3):
        out = resample_pos_embed(pe, new)[0, 1:].reshape(new, new, 64).numpy()
        ref = np.stack(
            [
                np.asarray(Image.fromarray(grid[:, :, c], mode="F").resize((new, new), Image.BICUBIC))
                for c in range(64)
            ],
            axis=-1,
        )
        np.testing.assert_allclose(out, ref, atol=1e-5)
