"""The trainer (`vpt.train`): recipe, accuracy on digits, frozen backbone, artifact = reported eval.

Backbone for the accuracy tests: a tiny ViT (vit_test_tiny's shape) with *fan-in scaled* random weights,
saved as a .safetensors checkpoint and loaded through `load_backbone(path)` like a user's file. Why not
`random:vit_test_tiny`: its timm-style init (std 0.02 at width 64) shrinks the image-dependent part of
the CLS feature to ~7% of its norm, so every method ends near 18-29% on digits (measured); with
1/sqrt(fan_in) weights the frozen net is a random-features extractor and the trainer's work shows.
Measured on this backbone (600 digits, 419 train / 181 val, 10 epochs, batch 32, base lr 2.5, P=4):
VPT-deep 56.9% val, VPT-shallow 61.9%, linear 58.6% (chance 10%). The bar below is 45%.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from prompt_store.artifact import load_artifact, validate_for_backbone
from vpt import HeadBatch, PromptBatch, VisionTransformer, get_preset
from vpt.hub import load_backbone
from vpt.train import (
    PAPER_LR_GRID,
    PAPER_WD_GRID,
    LabelledImages,
    Recipe,
    RunOptions,
    TaskData,
    TaskParams,
    TrainingDiverged,
    grid_search,
    stratified_split,
    train_task,
)
from vpt.train.data import EpochSampler, EvalImages, TrainImages
from vpt.train.job import run_training, signature
from vpt.train.recipe import make_optimizer, warmup_cosine

ACCURACY_BAR = 0.45  # measured 0.569 (see module docstring); chance is 0.10


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matrices: one thread is as fast and does not fight other test processes for the 2 cores.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits() -> LabelledImages:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    return LabelledImages.from_arrays(images, d.target.tolist(), [str(i) for i in range(10)])


def subsample(data: LabelledImages, n: int, seed: int = 0) -> LabelledImages:
    return data.subset(np.random.RandomState(seed).permutation(len(data))[:n].tolist())


@pytest.fixture(scope="module")
def features_ckpt(tmp_path_factory) -> Path:
    """vit_test_tiny with fan-in scaled random weights, as a checkpoint file (module docstring)."""
    cfg = get_preset("vit_test_tiny")
    g = torch.Generator().manual_seed(0)
    model = VisionTransformer(cfg)
    with torch.no_grad():  # every parameter set here, so the numbers above do not move with library inits
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
            elif p.ndim == 1:  # LayerNorm scale
                p.fill_(1.0)
            elif name == "pos_embed":
                p.normal_(0, 1.0, generator=g)
            else:
                p.normal_(0, p[0].numel() ** -0.5, generator=g)  # 1/sqrt(fan_in)
    path = tmp_path_factory.mktemp("bb") / "features_vit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def features_bb(features_ckpt):
    return load_backbone(str(features_ckpt))


@pytest.fixture(scope="module")
def deep_run(features_bb, digits):
    """One VPT-deep training run shared by several tests (the expensive part of this file)."""
    before = {k: v.clone() for k, v in features_bb.model.state_dict().items()}
    train, val = stratified_split(subsample(digits, 600), 0.3, seed=0)
    recipe = Recipe(mode="deep", prompt_length=4, epochs=10, batch_size=32, base_lr=2.5, warmup_epochs=1)
    out = run_training(
        backbone=features_bb, train=train, val=val, recipe=recipe, opts=RunOptions(progress=False)
    )
    return out, before, val


# ------------------------------------------------------------------------------------------ recipe
def test_recipe_defaults_follow_the_paper():
    r = Recipe()
    assert (r.mode, r.epochs, r.batch_size, r.warmup_epochs, r.momentum) == ("deep", 100, 128, 10, 0.9)
    assert r.lr == pytest.approx(r.base_lr * 128 / 256)  # base lr scaled by batch/256
    assert Recipe(mode="deep").dropout == 0.1 and Recipe(mode="shallow").dropout == 0.0
    assert Recipe(mode="linear", prompt_dropout=0.5).dropout == 0.0  # no prompts to drop
    assert PAPER_LR_GRID == (50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05)
    assert PAPER_WD_GRID == (0.01, 0.001, 0.0001, 0.0)
    with pytest.raises(ValueError, match="prompt-length"):
        Recipe(mode="deep", prompt_length=0)
    with pytest.raises(ValueError, match="warm-up"):
        Recipe(epochs=5, warmup_epochs=6)


def test_warmup_cosine_schedule():
    warm, total = 10, 100
    f = [warmup_cosine(s, warm, total) for s in range(total)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warm-up, no zero-lr step
    assert all(a < b for a, b in itertools.pairwise(f[:10]))
    assert f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(f[10:]))  # cosine decay
    assert f[55] == pytest.approx(0.5, abs=1e-9)  # half way through the decay
    assert 0 < f[-1] < 1e-3
    assert warmup_cosine(0, 0, 10) == 1.0  # no warm-up: starts at the full rate


def test_param_init_and_optimizer_groups():
    cfg = get_preset("vit_test_tiny")
    p = TaskParams(cfg, Recipe(mode="deep", prompt_length=50), 200, torch.Generator().manual_seed(0))
    v = cfg.prompt_init_bound
    assert p.prompts.shape == (cfg.depth, 50, cfg.embed_dim)
    assert p.prompts.abs().max() <= v and p.prompts.abs().max() > 0.95 * v  # U(-v, v)
    assert p.prompts.std().item() == pytest.approx(v / 3**0.5, rel=0.05)
    # kaiming normal, fan_out = C for a (C, D) weight: std sqrt(2 / C)
    assert p.head_weight.std().item() == pytest.approx((2 / 200) ** 0.5, rel=0.05)
    assert torch.count_nonzero(p.head_bias) == 0
    opt = make_optimizer(p, Recipe(mode="deep", weight_decay=0.01))
    assert all(g["momentum"] == 0.9 for g in opt.param_groups)
    bias_group = next(g for g in opt.param_groups if any(t is p.head_bias for t in g["params"]))
    assert bias_group["weight_decay"] == 0.0  # official: no decay on the head bias
    other = next(g for g in opt.param_groups if g is not bias_group)
    assert other["weight_decay"] == 0.01
    assert p.trainable_params() == cfg.depth * 50 * cfg.embed_dim + 200 * cfg.embed_dim + 200


# ------------------------------------------------------------------------------------------ data
def test_stratified_split(digits):
    data = subsample(digits, 300)
    train, val = stratified_split(data, 0.2, seed=3)
    assert len(train) + len(val) == 300
    assert all(c > 0 for c in val.counts()) and all(c > 0 for c in train.counts())
    assert {id(x) for x in train.images}.isdisjoint({id(x) for x in val.images})
    again = stratified_split(data, 0.2, seed=3)[1]
    assert [id(x) for x in again.images] == [id(x) for x in val.images]


def test_augmentation_is_a_function_of_seed_epoch_and_index(features_bb, digits):
    data = subsample(digits, 20)
    views = TrainImages(data, features_bb.cfg, seed=7)
    assert torch.equal(views[3][0], TrainImages(data, features_bb.cfg, seed=7)[3][0])
    # Same sample, other epochs: different crops/flips (with 20 epochs, at least one differs).
    assert any(not torch.equal(views[3][0], views[e * 20 + 3][0]) for e in range(1, 20))
    s = EpochSampler(20, seed=1)
    s.set_epoch(2)
    idx = list(s)
    assert sorted(idx) == list(range(40, 60))


# ------------------------------------------------------------------------------------------ training
def test_deep_prompt_tuning_on_digits_beats_the_bar(deep_run):
    out, _, _ = deep_run
    res = out.result
    assert res.val_eval is not None
    assert res.val_eval.accuracy >= ACCURACY_BAR, res.val_eval.accuracy
    assert res.train_eval.accuracy >= ACCURACY_BAR
    assert res.history[-1]["loss"] < res.history[0]["loss"]


def test_backbone_frozen_bit_identical_and_in_eval_mode(deep_run, features_bb):
    _, before, _ = deep_run
    after = features_bb.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not features_bb.model.training
    assert all(not m.training for m in features_bb.model.modules())
    assert not any(p.requires_grad for p in features_bb.model.parameters())


def _served_logits(model: VisionTransformer, task, x: torch.Tensor, deep: bool = True) -> torch.Tensor:
    """Logits of a task (an artifact or a `TrainResult`: prompts, head_weight, head_bias) for images `x`
    through the serving path (PromptBatch/HeadBatch)."""
    B = x.shape[0]
    return model(
        model.normalize(x),
        PromptBatch.single_task(task.prompts.to(x.device), B, deep=deep),
        HeadBatch(
            task.head_weight[None].to(x.device),
            task.head_bias[None].to(x.device),
            torch.zeros(B, dtype=torch.long, device=x.device),
        ),
    )


def test_artifact_predictions_equal_reported_eval(deep_run, features_bb):
    """Rebuild the task from the artifact bytes, serve it through PromptBatch/HeadBatch on eval_transform
    images (the server's path) and compare with what the trainer reported."""
    out, _, val = deep_run
    art = load_artifact(out.data)
    validate_for_backbone(art, signature(features_bb))
    assert (
        art.mode == "deep" and art.prompts.shape == (2, 4, 64) and art.labels == [str(i) for i in range(10)]
    )
    x = torch.stack([EvalImages(val, features_bb.cfg)[i][0] for i in range(len(val))])
    with torch.no_grad():
        logits = _served_logits(features_bb.model, art, x)
    assert logits.argmax(1).tolist() == out.result.val_eval.predictions
    acc = (logits.argmax(1) == torch.tensor(val.targets)).float().mean().item()
    assert acc == pytest.approx(out.summary["val_accuracy"], abs=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_on_cuda(features_ckpt, features_bb, digits):
    """The GPU path of the recipe (bf16 autocast, pinned loaders): same bar as on the CPU, frozen backbone,
    and the artifact reproduces the reported evaluation, on the GPU exactly and on the CPU in fp32."""
    bb = load_backbone(str(features_ckpt), device="cuda")
    before = {k: v.clone() for k, v in bb.model.state_dict().items()}
    train, val = stratified_split(subsample(digits, 600), 0.3, seed=0)
    recipe = Recipe(mode="deep", prompt_length=4, epochs=10, batch_size=32, base_lr=2.5, warmup_epochs=1)
    opts = RunOptions(device=torch.device("cuda"), progress=False)
    out = run_training(backbone=bb, train=train, val=val, recipe=recipe, opts=opts)
    assert out.result.val_eval is not None and out.result.val_eval.accuracy >= ACCURACY_BAR
    assert all(torch.equal(before[k], v) for k, v in bb.model.state_dict().items())
    art = load_artifact(out.data)
    validate_for_backbone(art, signature(bb))
    x = torch.stack([EvalImages(val, bb.cfg)[i][0] for i in range(len(val))])
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        gpu = _served_logits(bb.model, art, x.cuda()).argmax(1).tolist()
    assert gpu == out.result.val_eval.predictions
    with torch.no_grad():  # bf16 rounding may flip a near tie; fp32 on the CPU agrees almost everywhere
        cpu = _served_logits(features_bb.model, art, x).argmax(1).tolist()
    assert sum(a == b for a, b in zip(cpu, gpu, strict=True)) >= 0.95 * len(gpu)


def test_summary_report(deep_run):
    out, _, val = deep_run
    s = out.summary
    assert s["artifact_bytes"] == len(out.data)
    assert s["trainable_params"] == 2 * 4 * 64 + 10 * 64 + 10 == out.result.trainable_params
    assert s["train_accuracy"] == pytest.approx(out.result.train_eval.accuracy, abs=1e-4)
    assert s["per_class_split"] == "val" and len(s["per_class_accuracy"]) == 10
    assert sum(s["per_class_accuracy"].values()) / 10 == pytest.approx(s["val_accuracy"], abs=0.05)
    assert s["recipe"]["lr"] == pytest.approx(2.5 * 32 / 256) and s["recipe"]["prompt_dropout"] == 0.1
    assert s["data"] == {"train_images": 600 - len(val), "val_images": len(val), "classes": 10}
    assert len(s["loss_per_epoch"]) == 10 and s["grid"] is None
    assert load_artifact(out.data).train_summary == s


def test_linear_probe_artifact(features_bb, digits):
    train, val = stratified_split(subsample(digits, 120), 0.25, seed=0)
    recipe = Recipe(mode="linear", epochs=2, batch_size=32, base_lr=2.5, warmup_epochs=0)
    out = run_training(
        backbone=features_bb, train=train, val=val, recipe=recipe, opts=RunOptions(progress=False)
    )
    art = load_artifact(out.data)
    assert art.mode == "shallow" and art.prompts.shape == (1, 0, 64)
    assert out.result.trainable_params == 10 * 64 + 10


def test_deterministic_on_cpu_across_workers(features_bb, digits):
    train = subsample(digits, 64)
    data = TaskData(train, None, features_bb.cfg)
    recipe = Recipe(
        mode="deep", prompt_length=3, epochs=2, batch_size=16, base_lr=2.5, warmup_epochs=1, seed=5
    )
    a = train_task(features_bb.model, data, recipe, RunOptions(progress=False))
    b = train_task(features_bb.model, data, recipe, RunOptions(progress=False, workers=2))
    assert torch.equal(a.prompts, b.prompts) and torch.equal(a.head_weight, b.head_weight)
    assert a.train_eval.predictions == b.train_eval.predictions
    c = train_task(features_bb.model, data, dataclasses.replace(recipe, seed=6), RunOptions(progress=False))
    assert not torch.equal(a.prompts, c.prompts)


def test_prompt_dropout_is_applied_in_training_only(features_bb, digits):
    """Same seed and data: prompt dropout changes what is learned (it is applied in the training
    forward), and evaluation does not drop (the reported eval of the result equals a fresh evaluation)."""
    data = TaskData(subsample(digits, 64), None, features_bb.cfg)
    recipe = Recipe(mode="deep", prompt_length=3, epochs=1, batch_size=16, base_lr=2.5, warmup_epochs=0)
    recipe = dataclasses.replace(recipe, prompt_dropout=0.0)
    plain = train_task(features_bb.model, data, recipe, RunOptions(progress=False))
    again = train_task(features_bb.model, data, recipe, RunOptions(progress=False))
    dropped = train_task(
        features_bb.model, data, dataclasses.replace(recipe, prompt_dropout=0.5), RunOptions(progress=False)
    )
    assert torch.equal(plain.prompts, again.prompts)
    assert not torch.equal(plain.prompts, dropped.prompts)
    x = torch.stack([EvalImages(data.train, features_bb.cfg)[i][0] for i in range(len(data.train))])
    with torch.no_grad():
        logits = _served_logits(features_bb.model, dropped, x)
    assert logits.argmax(1).tolist() == dropped.train_eval.predictions


def test_grid_search_reports_every_setting_and_skips_divergence(features_bb, digits):
    train, val = stratified_split(subsample(digits, 100), 0.3, seed=0)
    data = TaskData(train, val, features_bb.cfg)
    recipe = Recipe(mode="shallow", prompt_length=2, epochs=1, batch_size=32, warmup_epochs=0)
    best, runs = grid_search(
        features_bb.model, data, recipe, [1e30, 0.5], [0.0, 0.01], RunOptions(progress=False)
    )
    assert [(r.base_lr, r.weight_decay) for r in runs] == [(1e30, 0.0), (1e30, 0.01), (0.5, 0.0), (0.5, 0.01)]
    assert [r.status for r in runs] == ["diverged", "diverged", "ok", "ok"]
    ok = [r for r in runs if r.status == "ok"]
    assert best.recipe.base_lr == 0.5
    assert best.val_eval is not None and best.val_eval.accuracy == max(r.val_accuracy for r in ok)
    with pytest.raises(TrainingDiverged):
        train_task(
            features_bb.model, data, dataclasses.replace(recipe, base_lr=1e30), RunOptions(progress=False)
        )


def test_train_result_tensors_are_in_the_save_dtype(features_bb, digits):
    data = TaskData(subsample(digits, 40), None, features_bb.cfg)
    recipe = Recipe(mode="shallow", prompt_length=2, epochs=1, batch_size=20, warmup_epochs=0)
    res = train_task(features_bb.model, data, recipe, RunOptions(progress=False, save_dtype=torch.bfloat16))
    assert res.prompts.dtype == res.head_weight.dtype == res.head_bias.dtype == torch.bfloat16


def test_run_training_refuses_mismatched_val_classes(features_bb, digits):
    train = subsample(digits, 30)
    val = LabelledImages(train.images[:5], [0] * 5, ["a", "b"])
    with pytest.raises(ValueError, match="validation classes"):
        TaskData(train, val, features_bb.cfg)


def test_load_labelled_images_is_decode_once_and_resized(features_bb, tmp_path: Path):
    from PIL import Image

    from vpt.train.data import load_labelled_images

    for label in ("x", "y"):
        (tmp_path / label).mkdir()
        for i in range(2):
            Image.new("RGB", (80, 60), (i * 100, 0, 0)).save(tmp_path / label / f"{i}.png")
    data = load_labelled_images(tmp_path, features_bb.cfg)
    assert data.classes == ["x", "y"] and data.targets == [0, 0, 1, 1]
    side = features_bb.cfg.resize_size
    assert all(isinstance(im, Image.Image) and min(im.size) == side for im in data.images)
    lazy = load_labelled_images(tmp_path, features_bb.cfg, cache_bytes=0)
    assert isinstance(lazy.images[-1], Path)  # over budget: decoded per access
    assert torch.equal(EvalImages(lazy, features_bb.cfg)[3][0], EvalImages(data, features_bb.cfg)[3][0])
