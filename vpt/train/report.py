"""The final training report: one JSON-able summary, stored in the artifact and printed for people.

The issue asks for train/val accuracy, per-class accuracy, trainable parameters and artifact bytes; we
add the recipe (so a task can be re-trained), the grid (every setting, as the paper tunes on val),
the loss curve and timing. The artifact's size is part of its own header, so it is found by iterating
to a fixed point (the size only changes when its digit count does).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from vpt.train.grid import GridRun
from vpt.train.loop import EvalResult, TrainResult

SUMMARY_VERSION = 1


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(float(x), nd)


def per_class(ev: EvalResult, classes: Sequence[str]) -> dict[str, float | None]:
    # Labels may repeat in principle; suffix duplicates so no class's number is lost.
    out: dict[str, float | None] = {}
    for name, acc in zip(classes, ev.per_class, strict=True):
        key = name if name not in out else f"{name}#{len(out)}"
        out[key] = _r(acc)
    return out


def build_summary(
    result: TrainResult,
    classes: Sequence[str],
    *,
    backbone_id: str,
    data: dict[str, Any],
    grid: list[GridRun] | None,
    device: str,
) -> dict[str, Any]:
    """Everything a reader of the artifact needs to judge the task (artifact_bytes filled later)."""
    tr, va = result.train_eval, result.val_eval
    ev, split = (va, "val") if va is not None else (tr, "train")
    tensor_bytes = sum(
        t.numel() * t.element_size() for t in (result.prompts, result.head_weight, result.head_bias)
    )
    return {
        "summary_version": SUMMARY_VERSION,
        "trainer": "vpt train",
        "backbone": backbone_id,
        "mode": result.recipe.mode,
        "prompt_length": result.recipe.num_prompts,
        "recipe": {k: (_r(v, 8) if isinstance(v, float) else v) for k, v in result.recipe.to_dict().items()},
        "data": data,
        "train_accuracy": _r(tr.accuracy),
        "train_loss": _r(tr.loss),
        "val_accuracy": _r(va.accuracy) if va else None,
        "val_loss": _r(va.loss) if va else None,
        "per_class_split": split,
        "per_class_accuracy": per_class(ev, classes),
        "trainable_params": result.trainable_params,
        "tensor_bytes": tensor_bytes,
        "dtype": str(result.prompts.dtype).removeprefix("torch."),
        "artifact_bytes": 0,
        "loss_per_epoch": [_r(h["loss"]) for h in result.history],
        "grid": [g.to_dict() for g in grid] if grid is not None else None,
        "seconds": _r(result.seconds, 2),
        "device": device,
        "torch": torch.__version__,
    }


def serialise_with_size(summary: dict[str, Any], serialise: Callable[[dict[str, Any]], bytes]) -> bytes:
    """Serialise with `summary["artifact_bytes"]` equal to the length of the result."""
    for _ in range(8):
        data = serialise(summary)
        if summary["artifact_bytes"] == len(data):
            return data
        summary["artifact_bytes"] = len(data)
    raise RuntimeError("artifact size did not settle")  # impossible unless serialise is not deterministic


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def format_report(summary: dict[str, Any]) -> str:
    """Human-readable report (stdout of `vpt train`)."""
    rec = summary["recipe"]
    d = summary["data"]
    lines = [
        "== vpt train report ==",
        f"backbone        {summary['backbone']}",
        f"mode            {summary['mode']} (P={summary['prompt_length']})",
        f"recipe          base lr {rec['base_lr']:g} (lr {rec['lr']:g} at batch {rec['batch_size']}), "
        f"wd {rec['weight_decay']:g}, {rec['epochs']} epochs ({rec['warmup_epochs']} warm-up), "
        f"prompt dropout {rec['prompt_dropout']:g}, seed {rec['seed']}",
        f"data            {d['train_images']} train / {d['val_images']} val images, {d['classes']} classes",
        f"train accuracy  {_pct(summary['train_accuracy'])} (loss {summary['train_loss']:.4f})",
    ]
    if summary["val_accuracy"] is not None:
        lines.append(f"val accuracy    {_pct(summary['val_accuracy'])} (loss {summary['val_loss']:.4f})")
    lines.append(f"per-class ({summary['per_class_split']}):")
    items = list(summary["per_class_accuracy"].items())
    width = max((len(k) for k, _ in items), default=0)
    for name, acc in items:
        lines.append(f"  {name:<{width}}  {_pct(acc)}")
    if summary["grid"]:
        lines.append("grid (base lr, wd → val accuracy):")
        for g in summary["grid"]:
            res = _pct(g["val_accuracy"]) if g["status"] == "ok" else g["status"]
            mark = (
                " *"
                if g["base_lr"] == rec["base_lr"]
                and g["weight_decay"] == rec["weight_decay"]
                and g["status"] == "ok"
                else ""
            )
            lines.append(f"  {g['base_lr']:>8g}  {g['weight_decay']:>8g}  {res}{mark}")
    lines += [
        f"trainable params {summary['trainable_params']:,}",
        f"artifact bytes  {summary['artifact_bytes']:,} ({summary['dtype']}; tensors {summary['tensor_bytes']:,})",
        f"time            {summary['seconds']:.1f}s on {summary['device']}",
    ]
    return "\n".join(lines)
