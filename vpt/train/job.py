"""`vpt train` end to end: backbone spec + labelled images → validated, upload-ready task artifact.

Steps: load the frozen backbone exactly as the server does (`vpt.hub.load_backbone`, same spec and
img_size → same fingerprint); read and decode the images once; split off validation images (the paper
holds out part of each training set to pick hyper-parameters, Jia et al., ECCV 2022, arXiv
2203.12119, Sec. 4.1); train with the paper's recipe, or grid-search lr × wd on validation; evaluate
with the server's preprocessing; build the artifact, check it against the backbone
(`validate_for_backbone`) and write it atomically.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prompt_store.artifact import (
    BackboneSignature,
    TaskArtifact,
    atomic_write,
    load_artifact,
    save_artifact,
    validate_for_backbone,
)
from vpt.hub import Backbone, load_backbone
from vpt.train.data import LabelledImages, load_labelled_images, stratified_split
from vpt.train.grid import GridRun, grid_search
from vpt.train.loop import RunOptions, TaskData, TrainResult, train_task
from vpt.train.recipe import Recipe
from vpt.train.report import build_summary, serialise_with_size

SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """'auto' → CUDA when present, else CPU; anything else as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def default_workers(device: torch.device) -> int:
    # On a GPU the host must crop/flip fast enough to keep up; on the CPU workers only compete with
    # the model's own threads for the same cores.
    return min(8, max(0, (os.cpu_count() or 1) - 1)) if device.type == "cuda" else 0


def signature(backbone: Backbone) -> BackboneSignature:
    return BackboneSignature(
        embed_dim=backbone.cfg.embed_dim,
        depth=backbone.cfg.depth,
        fingerprint=backbone.fingerprint,
        backbone_id=backbone.backbone_id,
    )


@dataclass
class TrainOutput:
    """What a finished job hands back (the CLI prints `summary`, uploads `data`)."""

    artifact: TaskArtifact
    data: bytes  # the serialised artifact, exactly what was written to disk
    summary: dict[str, Any]  # also stored as the artifact's train_summary
    result: TrainResult  # the selected run (with its evaluations and predictions)
    grid: list[GridRun] | None
    backbone: Backbone


def build_artifact(
    result: TrainResult,
    backbone: Backbone,
    classes: Sequence[str],
    summary: dict[str, Any],
    name: str | None = None,
    description: str | None = None,
) -> tuple[TaskArtifact, bytes]:
    """Artifact + bytes, validated against the backbone it was trained on before anything is written."""
    artifact = TaskArtifact(
        prompts=result.prompts,
        head_weight=result.head_weight,
        head_bias=result.head_bias,
        mode=result.recipe.artifact_mode,
        backbone=backbone.backbone_id,
        backbone_fingerprint=backbone.fingerprint,
        labels=list(classes),
        name=name,
        description=description,
        train_summary=summary,
    )
    validate_for_backbone(artifact, signature(backbone))

    def serialise(s: dict[str, Any]) -> bytes:
        return save_artifact(dataclasses.replace(artifact, train_summary=s))

    data = serialise_with_size(summary, serialise)
    artifact = load_artifact(data)  # what the server will see (proves the bytes read back)
    validate_for_backbone(artifact, signature(backbone))
    return artifact, data


def run_training(
    *,
    backbone: Backbone,
    train: LabelledImages,
    val: LabelledImages | None,
    recipe: Recipe,
    opts: RunOptions,
    grid: tuple[Sequence[float], Sequence[float]] | None = None,
    data_info: dict[str, Any] | None = None,
    name: str | None = None,
    description: str | None = None,
    on_grid_run: Callable[[GridRun], None] | None = None,
) -> TrainOutput:
    """Train on already loaded images and build the artifact (nothing written).

    `grid`: (base lrs, weight decays) to search on `val` (e.g. `PAPER_LR_GRID, PAPER_WD_GRID`); the
    best setting's run becomes the artifact. None: one run with `recipe` as given.
    """
    data = TaskData(train, val, backbone.cfg)
    grid_runs: list[GridRun] | None = None
    if grid is not None:
        result, grid_runs = grid_search(backbone.model, data, recipe, grid[0], grid[1], opts, on_grid_run)
    else:
        result = train_task(backbone.model, data, recipe, opts)
    info = {
        "train_images": len(train),
        "val_images": len(val) if val is not None else 0,
        "classes": len(train.classes),
        **(data_info or {}),
    }
    summary = build_summary(
        result,
        train.classes,
        backbone_id=backbone.backbone_id,
        data=info,
        grid=grid_runs,
        device=str(opts.device),
    )
    artifact, blob = build_artifact(result, backbone, train.classes, summary, name, description)
    return TrainOutput(artifact, blob, artifact.train_summary or summary, result, grid_runs, backbone)


def train_from_paths(
    *,
    backbone_spec: str,
    data: str | Path,
    recipe: Recipe,
    opts: RunOptions,
    out: str | Path,
    val_dir: str | Path | None = None,
    val_split: float = 0.1,
    img_size: int | None = None,
    grid: tuple[Sequence[float], Sequence[float]] | None = None,
    cache_bytes: int = 2 << 30,
    name: str | None = None,
    description: str | None = None,
    on_grid_run: Callable[[GridRun], None] | None = None,
) -> TrainOutput:
    """The whole `vpt train` job: load, split, train, validate, write `out`."""
    bb = load_backbone(backbone_spec, device=opts.device, img_size=img_size)
    images = load_labelled_images(data, bb.cfg, cache_bytes=cache_bytes)
    if val_dir is not None:
        train = images
        val = load_labelled_images(val_dir, bb.cfg, classes=images.classes, cache_bytes=cache_bytes)
        val_source = f"dir {val_dir}"
    elif val_split > 0:
        train, val = stratified_split(images, val_split, recipe.seed)
        val_source = f"split {val_split:g} (seed {recipe.seed})"
    else:
        train, val, val_source = images, None, "none"
    output = run_training(
        backbone=bb,
        train=train,
        val=val,
        recipe=recipe,
        opts=opts,
        grid=grid,
        data_info={"source": str(data), "val_source": val_source},
        name=name,
        description=description,
        on_grid_run=on_grid_run,
    )
    atomic_write(out, output.data)
    return output
