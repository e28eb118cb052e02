"""Transfer experiment on scikit-learn's digits: linear probe vs VPT-shallow vs VPT-deep.

The VPT paper (Jia et al., ECCV 2022, arXiv 2203.12119, Table 1 / Fig. 3) finds, on a frozen
pretrained ViT, deep >= shallow >= linear. This reproduces the *setting* at a size two CPU cores run
in a few minutes, with nothing to download:

1. pretrain a small ViT (D=64, depth 4, 16x16 inputs, 4x4 patches) with a temporary head on digits
   0-4 (full training, AdamW, the trainer's crop/flip augmentation);
2. freeze it, save it as a .safetensors checkpoint and load it back through `vpt.hub.load_backbone`
   (exactly what `vpt train --backbone PATH` does, fingerprint included);
3. on digits 5-9 (classes the backbone never saw), split off a fixed test half; for each mode pick the
   base lr on a validation split of the other half (seed 0, the paper tunes on val), then train with
   seeds 0..n-1 on the whole train half and report test accuracy mean ± std, trainable parameters and
   artifact bytes.

    .venv/bin/python benchmarks/transfer_digits.py --threads 1   # ~5 CPU-minutes
    .venv/bin/python benchmarks/transfer_digits.py --quick    # smoke run (~1 min)

Results and the exact command are recorded in docs/training.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

# Run as a script from the repository root: make `vpt` importable without installing.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vpt.config import ViTConfig
from vpt.hub import Backbone, load_backbone
from vpt.train.data import LabelledImages, TrainImages, stratified_split
from vpt.train.grid import grid_search
from vpt.train.job import run_training
from vpt.train.loop import RunOptions, TaskData
from vpt.train.recipe import Recipe
from vpt.vit import VisionTransformer

# 16x16 inputs with 4x4 patches: each patch covers 2x2 of the original 8x8 digit pixels.
BACKBONE_CFG = ViTConfig(img_size=16, patch_size=4, embed_dim=64, depth=4, num_heads=4)
PRETRAIN_CLASSES = range(0, 5)
TRANSFER_CLASSES = range(5, 10)


def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8), 0..16 → 0..255
    return images, d.target.astype(np.int64)


def subset(images: np.ndarray, targets: np.ndarray, classes: range) -> LabelledImages:
    keep = np.isin(targets, list(classes))
    return LabelledImages.from_arrays(
        images[keep], (targets[keep] - classes.start).tolist(), [str(c) for c in classes]
    )


@torch.no_grad()
def init_weights(model: nn.Module, g: torch.Generator) -> None:
    """timm's ViT init (trunc-normal std 0.02, zero biases, unit LayerNorm), spelled out here so the
    recorded numbers do not move when a library init changes."""
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            p.zero_()
        elif p.ndim == 1:  # LayerNorm scale
            p.fill_(1.0)
        else:
            nn.init.trunc_normal_(p, std=0.02, a=-0.04, b=0.04, generator=g)


def pretrain(data: LabelledImages, epochs: int, seed: int, log: bool) -> VisionTransformer:
    """Full training of backbone + temporary linear head (the head is thrown away afterwards)."""
    g = torch.Generator().manual_seed(seed)
    model = VisionTransformer(BACKBONE_CFG)
    head = nn.Linear(BACKBONE_CFG.embed_dim, len(data.classes))
    init_weights(model, g)
    init_weights(head, g)
    params = [*model.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.05)
    batch = 64
    steps = epochs * math.ceil(len(data) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    views = TrainImages(data, BACKBONE_CFG, seed)
    # The whole augmented epoch is materialised at once: 900 tiny images, much faster than a DataLoader.
    for epoch in range(epochs):
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        x = torch.stack([views[epoch * len(data) + i][0] for i in range(len(data))])  # (N, 3, 16, 16) uint8
        y = torch.tensor(data.targets)
        model.train()
        correct = 0
        for b in range(0, len(order), batch):
            idx = order[b : b + batch]
            logits = head(model(model.normalize(x[idx])))
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            correct += (logits.argmax(1) == y[idx]).sum().item()
        if log and (epoch + 1) % 5 == 0:
            print(
                f"  pretrain epoch {epoch + 1}/{epochs}: train acc {correct / len(data):.3f}", file=sys.stderr
            )
    return model.eval().requires_grad_(False)


def run(args: argparse.Namespace) -> dict[str, object]:
    torch.set_num_threads(args.threads)
    images, targets = digits()
    t0 = time.perf_counter()
    backbone_model = pretrain(
        subset(images, targets, PRETRAIN_CLASSES), args.pretrain_epochs, 0, not args.quiet
    )
    pretrain_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "digits_vit.safetensors"
        save_file({k: v.contiguous() for k, v in backbone_model.state_dict().items()}, str(path))
        bb: Backbone = load_backbone(str(path))
    assert bb.cfg.img_size == BACKBONE_CFG.img_size and bb.cfg.depth == BACKBONE_CFG.depth

    transfer = subset(images, targets, TRANSFER_CLASSES)
    trainval, test = stratified_split(transfer, 0.5, seed=1234)  # fixed held-out test half
    train_sel, val_sel = stratified_split(trainval, 0.2, seed=0)  # lr selection only
    opts = RunOptions(progress=False)
    base = Recipe(
        epochs=args.epochs,
        batch_size=32,
        warmup_epochs=max(1, args.epochs // 10),
        prompt_length=args.prompt_length,
        weight_decay=1e-4,
    )
    rows = []
    for mode in ("linear", "shallow", "deep"):
        recipe = dataclasses.replace(base, mode=mode, seed=0)
        t = time.perf_counter()
        best, grid = grid_search(
            bb.model, TaskData(train_sel, val_sel, bb.cfg), recipe, args.lrs, [1e-4], opts
        )
        chosen = best.recipe.base_lr
        if not args.quiet:
            shown = ", ".join(
                f"{g.base_lr:g}: {g.val_accuracy:.3f}"
                if g.val_accuracy is not None
                else f"{g.base_lr:g}: {g.status}"
                for g in grid
            )
            print(f"{mode}: val accuracy by base lr {{{shown}}} → {chosen:g}", file=sys.stderr)
        accs, bytes_, params = [], 0, 0
        for seed in range(args.seeds):
            out = run_training(
                backbone=bb,
                train=trainval,
                val=test,  # evaluated only: nothing is selected on the test half
                recipe=dataclasses.replace(recipe, base_lr=chosen, seed=seed),
                opts=opts,
            )
            assert out.result.val_eval is not None
            accs.append(out.result.val_eval.accuracy)
            bytes_, params = len(out.data), out.result.trainable_params
            if not args.quiet:
                print(f"  {mode} seed {seed}: test accuracy {accs[-1]:.4f}", file=sys.stderr)
        rows.append(
            {
                "mode": mode,
                "prompt_length": 0 if mode == "linear" else args.prompt_length,
                "base_lr": chosen,
                "test_acc_mean": statistics.mean(accs),
                "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "test_accs": accs,
                "trainable_params": params,
                "artifact_bytes": bytes_,
                "seconds": time.perf_counter() - t,
            }
        )
    return {
        "backbone": dataclasses.asdict(BACKBONE_CFG),
        "pretrain_epochs": args.pretrain_epochs,
        "pretrain_seconds": pretrain_s,
        "transfer_train_images": len(trainval),
        "transfer_test_images": len(test),
        "epochs": args.epochs,
        "seeds": args.seeds,
        "rows": rows,
        "threads": torch.get_num_threads(),
    }


def table(result: dict[str, object]) -> str:
    lines = [
        "| method | P | base lr (val) | test accuracy (mean ± std) | trainable params / task | artifact bytes (f32) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:  # type: ignore[union-attr]
        name = {"linear": "linear probe", "shallow": "VPT-shallow", "deep": "VPT-deep"}[r["mode"]]
        lines.append(
            f"| {name} | {r['prompt_length']} | {r['base_lr']:g} | {100 * r['test_acc_mean']:.1f} ± "
            f"{100 * r['test_acc_std']:.1f}% | {r['trainable_params']:,} | {r['artifact_bytes']:,} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--pretrain-epochs", type=int, default=30)
    p.add_argument("--epochs", type=int, default=30, help="prompt/probe training epochs")
    p.add_argument("--prompt-length", type=int, default=10)
    p.add_argument(
        "--lrs", type=float, nargs="+", default=[0.5, 2.5, 10.0, 50.0], help="base lrs tried on val"
    )
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--quick", action="store_true", help="tiny smoke run (few epochs, 2 seeds)")
    p.add_argument("--json", metavar="FILE", help="also write the raw results here")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.pretrain_epochs, args.epochs, args.seeds = 5, 5, 2
    t = time.perf_counter()
    result = run(args)
    result["total_seconds"] = time.perf_counter() - t
    print(table(result))
    print(
        f"\npretrain {result['pretrain_epochs']} epochs ({result['pretrain_seconds']:.0f}s); transfer on "
        f"{result['transfer_train_images']} train / {result['transfer_test_images']} test images, "
        f"{result['epochs']} epochs, {result['seeds']} seeds; total {result['total_seconds']:.0f}s "
        f"on {result['threads']} CPU thread(s)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
