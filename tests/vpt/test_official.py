"""`vpt import-official`: prompts written by the official VPT code (KMnP/vpt) become artifacts.

Files are written here with `torch.save` in exactly the official layouts:
- `Trainer.save_prompt`: {"shallow_prompt": ndarray (1,P,D), "deep_prompt": ndarray (L-1,P,D)};
- fvcore `Checkpointer.save`: {"model": state_dict, ...} with `enc.transformer.prompt_embeddings`,
  `enc.transformer.deep_prompt_embeddings`, `head.last_layer.weight` / `bias` and backbone weights.
The imported task's logits are compared with the official forward (`PromptedTransformer`
`incorporate_prompt` + `forward_deep_prompt`, then `head(x[:, 0])`) written out below.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from clients.cli import main
from prompt_store.artifact import ArtifactError, load_artifact, read_artifact, validate_for_backbone
from vpt import HeadBatch, PromptBatch
from vpt.hub import load_backbone
from vpt.official import OfficialImportError, official_to_artifact, parse_official, read_official
from vpt.train.job import signature

SPEC = "random:vit_test_tiny@0"
P = 4
C = 3


@pytest.fixture(scope="module")
def bb():
    return load_backbone(SPEC)


def _official_tensors(D: int, L: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "shallow": torch.empty(1, P, D).uniform_(-0.1, 0.1, generator=g),
        "deep": torch.empty(L - 1, P, D).uniform_(-0.1, 0.1, generator=g),
        "w": torch.randn(C, D, generator=g) * 0.1,
        "b": torch.randn(C, generator=g) * 0.1,
    }


def official_logits(model, images, shallow, deep, w, b):
    """The official forward: prompts after CLS (after pos-embed), deep ones replace per layer."""
    B = images.shape[0]
    x = model.embed(images)
    x = torch.cat([x[:, :1], shallow.expand(B, -1, -1), x[:, 1:]], dim=1)
    for i, blk in enumerate(model.blocks):
        if deep is not None and i > 0:
            x = torch.cat([x[:, :1], deep[i - 1].expand(B, -1, -1), x[:, 1 + shallow.shape[1] :]], dim=1)
        x = blk(x)
    return model.norm(x)[:, 0] @ w.T + b


def our_logits(model, images, artifact):
    B = images.shape[0]
    prompts = PromptBatch.single_task(artifact.prompts.float(), B, deep=artifact.mode == "deep")
    zeros = torch.zeros(B, dtype=torch.long)
    heads = HeadBatch(artifact.head_weight.float()[None], artifact.head_bias.float()[None], zeros)
    return model(images, prompts, heads)


@pytest.fixture(scope="module")
def images():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def test_prompt_file_deep_numpy_with_head_file(bb, images, tmp_path):
    """Per-epoch prompt file exactly as `save_prompt` writes it (numpy arrays) + a separate head."""
    t = _official_tensors(bb.cfg.embed_dim, bb.cfg.depth)
    prompt_file = tmp_path / "prompt_ep7.pth"
    torch.save({"shallow_prompt": t["shallow"].numpy(), "deep_prompt": t["deep"].numpy()}, prompt_file)
    head_file = tmp_path / "ckpt.pth"
    torch.save({"model": {"head.last_layer.weight": t["w"], "head.last_layer.bias": t["b"]}}, head_file)
    out = tmp_path / "task.safetensors"
    args = ["import-official", str(prompt_file), "--backbone", SPEC, "--head", str(head_file)]
    rc = main([*args, "--labels", "cat,dog,bird", "--out", str(out)])
    assert rc == 0
    art = read_artifact(out)
    validate_for_backbone(art, signature(bb))
    assert art.mode == "deep" and art.labels == ["cat", "dog", "bird"]
    assert torch.equal(art.prompts, torch.cat([t["shallow"], t["deep"]]))
    ref = official_logits(bb.model, images, t["shallow"], t["deep"], t["w"], t["b"])
    torch.testing.assert_close(our_logits(bb.model, images, art), ref, rtol=1e-5, atol=1e-5)


def test_state_dict_checkpointer_layout_shallow(bb, images, tmp_path):
    """{"model": state_dict} from fvcore's Checkpointer, VPT-shallow (no deep prompts), with a head and
    backbone weights; labels from a file."""
    t = _official_tensors(bb.cfg.embed_dim, bb.cfg.depth, seed=1)
    sd = {
        "enc.transformer.prompt_embeddings": t["shallow"],
        "enc.transformer.embeddings.cls_token": torch.zeros(1, 1, bb.cfg.embed_dim),
        "enc.transformer.encoder.encoder_norm.weight": torch.ones(bb.cfg.embed_dim),
        "head.last_layer.weight": t["w"],
        "head.last_layer.bias": t["b"],
    }
    ckpt = tmp_path / "last_model.pth"
    torch.save({"model": sd, "optimizer": {}, "scheduler": {}}, ckpt)
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\n")
    out = tmp_path / "task.safetensors"
    assert (
        main(["import-official", str(ckpt), "--backbone", SPEC, "--labels", str(labels), "--out", str(out)])
        == 0
    )
    art = read_artifact(out)
    assert (
        art.mode == "shallow"
        and art.prompts.shape == (1, P, bb.cfg.embed_dim)
        and art.labels == ["a", "b", "c"]
    )
    ref = official_logits(bb.model, images, t["shallow"], None, t["w"], t["b"])
    torch.testing.assert_close(our_logits(bb.model, images, art), ref, rtol=1e-5, atol=1e-5)


def test_state_dict_deep_ddp_prefix(bb):
    t = _official_tensors(bb.cfg.embed_dim, bb.cfg.depth, seed=2)
    sd = {
        "module.enc.transformer.prompt_embeddings": t["shallow"],
        "module.enc.transformer.deep_prompt_embeddings": t["deep"],
        "module.head.last_layer.weight": t["w"],
        "module.head.last_layer.bias": t["b"],
    }
    task = parse_official({"state_dict": sd})
    art = official_to_artifact(task, signature(bb), num_classes=C)
    assert art.mode == "deep" and art.labels == ["0", "1", "2"]
    assert torch.equal(art.prompts[1:], t["deep"])


def test_linear_probe_state_dict(bb):
    """An official linear-probe checkpoint (head, no prompts) imports as a P = 0 task; asking for a
    prompted mode is refused."""
    t = _official_tensors(bb.cfg.embed_dim, bb.cfg.depth)
    task = parse_official({"model": {"head.last_layer.weight": t["w"], "head.last_layer.bias": t["b"]}})
    art = official_to_artifact(task, signature(bb), mode="linear")
    assert art.prompts.shape == (1, 0, bb.cfg.embed_dim) and art.mode == "shallow"
    with pytest.raises(OfficialImportError, match="--mode deep"):
        official_to_artifact(task, signature(bb), mode="deep")


def test_pickled_object_refused_without_running_it(bb, tmp_path, capsys):
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    f = tmp_path / "prompt_ep1.pth"
    torch.save({"shallow_prompt": torch.zeros(1, P, 64), "note": Evil()}, f)
    rc = main(["import-official", str(f), "--backbone", SPEC, "--out", str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err
    assert rc == 1 and "refused" in err and "weights_only" in err
    assert not marker.exists()
    assert not (tmp_path / "x.safetensors").exists()


def test_object_array_refused(tmp_path):
    f = tmp_path / "prompt_ep1.pth"
    torch.save({"shallow_prompt": np.array([[[object()]]], dtype=object)}, f)
    with pytest.raises(OfficialImportError, match="refused"):
        read_official(f)


def test_missing_head_without_flags(bb, tmp_path, capsys):
    t = _official_tensors(bb.cfg.embed_dim, bb.cfg.depth)
    f = tmp_path / "prompt_ep3.pth"
    torch.save({"shallow_prompt": t["shallow"].numpy()}, f)
    out = tmp_path / "x.safetensors"
    rc = main(["import-official", str(f), "--backbone", SPEC, "--num-classes", "3", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "no head" in err and "--head" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("shallow_shape", "deep_shape", "match"),
    [
        ((1, P, 32), None, "D=32 does not match the backbone's embed_dim=64"),
        ((1, P, 64), (3, P, 64), "cover 4 layers .* depth 2"),
        ((1, P, 64), (1, P + 1, 64), "deep prompts must be"),
        ((2, P, 64), None, "shallow prompts must be"),
    ],
)
def test_shape_mismatch_vs_backbone(bb, tmp_path, capsys, shallow_shape, deep_shape, match):
    obj = {"shallow_prompt": np.zeros(shallow_shape, dtype=np.float32)}
    if deep_shape is not None:
        obj["deep_prompt"] = np.zeros(deep_shape, dtype=np.float32)
    f = tmp_path / "p.pth"
    torch.save(obj, f)
    head = tmp_path / "head.pth"
    torch.save({"weight": torch.zeros(C, 64), "bias": torch.zeros(C)}, head)
    rc = main(
        ["import-official", str(f), "--backbone", SPEC, "--head", str(head), "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert rc == 1
    assert re.search(match, err), err


def test_head_width_and_label_count_checked(bb):
    t = _official_tensors(bb.cfg.embed_dim, bb.cfg.depth)
    task = parse_official({"shallow_prompt": t["shallow"]})
    with pytest.raises(OfficialImportError, match="head must be weight"):
        official_to_artifact(task, signature(bb), head=(torch.zeros(C, 32), torch.zeros(C)))
    with pytest.raises(OfficialImportError, match="2 labels but the head has 3"):
        official_to_artifact(task, signature(bb), head=(t["w"], t["b"]), labels="x,y")
    with pytest.raises(OfficialImportError, match="--num-classes 5"):
        official_to_artifact(task, signature(bb), head=(t["w"], t["b"]), num_classes=5)


def test_prompt_proj_refused(bb):
    t = _official_tensors(bb.cfg.embed_dim, bb.cfg.depth)
    sd = {
        "enc.transformer.prompt_embeddings": t["shallow"],
        "enc.transformer.prompt_proj.weight": torch.zeros(64, 64),
        "enc.transformer.prompt_proj.bias": torch.zeros(64),
        "head.last_layer.weight": t["w"],
        "head.last_layer.bias": t["b"],
    }
    with pytest.raises(OfficialImportError, match="PROJECT"):
        parse_official({"model": sd})


def test_not_an_official_file(tmp_path):
    f = tmp_path / "other.pth"
    torch.save({"patch_embed.proj.weight": torch.zeros(1)}, f)
    with pytest.raises(OfficialImportError, match="not an official VPT file"):
        read_official(f)


def test_fingerprint_of_other_backbone_refused_on_load(bb, tmp_path):
    """The artifact is tied to the backbone named on the command line: another seed's weights refuse it."""
    t = _official_tensors(bb.cfg.embed_dim, bb.cfg.depth)
    f = tmp_path / "p.pth"
    torch.save({"shallow_prompt": t["shallow"].numpy()}, f)
    head = tmp_path / "head.pth"
    torch.save({"weight": t["w"], "bias": t["b"]}, head)
    out = tmp_path / "t.safetensors"
    assert main(["import-official", str(f), "--backbone", SPEC, "--head", str(head), "--out", str(out)]) == 0
    other = load_backbone("random:vit_test_tiny@1")
    with pytest.raises(ArtifactError, match="fingerprint"):
        validate_for_backbone(load_artifact(Path(out).read_bytes()), signature(other))
