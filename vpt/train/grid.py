"""Learning-rate × weight-decay grid search on a validation split.

The paper tunes both per task on a held-out validation set ("we use the val set of each dataset to
find optimal hyperparameters", Jia et al., ECCV 2022, arXiv 2203.12119, Sec. 4.1 / Appendix A), over
the grids of the official `tune_fgvc.py` (see `recipe.PAPER_LR_GRID`, `PAPER_WD_GRID`). Every setting
is trained from the same seed; the best validation accuracy wins (ties: lower validation loss, then
grid order). Settings that diverge are recorded and skipped, as the official trainer skips NaN runs.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vpt.train.loop import RunOptions, TaskData, TrainingDiverged, TrainResult, train_task
from vpt.train.recipe import Recipe
from vpt.vit import VisionTransformer


@dataclass
class GridRun:
    """One grid setting's outcome (kept in the artifact's train summary)."""

    base_lr: float  # base lr (at batch 256) of this setting
    weight_decay: float
    status: str  # "ok" or "diverged"
    val_accuracy: float | None
    val_loss: float | None
    train_accuracy: float | None
    seconds: float

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def grid_search(
    backbone: VisionTransformer,
    data: TaskData,
    recipe: Recipe,
    lrs: Sequence[float],
    wds: Sequence[float],
    opts: RunOptions,
    on_run: Callable[[GridRun], None] | None = None,
) -> tuple[TrainResult, list[GridRun]]:
    """Train every (lr, wd) pair; return the best run's result and all settings' outcomes."""
    if data.val_eval is None:
        raise ValueError("a grid search needs validation data (--val-split or --val-dir)")
    if not lrs or not wds:
        raise ValueError("empty lr or weight-decay grid")
    best: TrainResult | None = None
    best_key: tuple[float, float] | None = None
    runs: list[GridRun] = []
    for lr in lrs:
        for wd in wds:
            r = dataclasses.replace(recipe, base_lr=lr, weight_decay=wd)
            t0 = time.perf_counter()
            try:
                res = train_task(backbone, data, r, dataclasses.replace(opts, desc=f"lr {lr:g} wd {wd:g}"))
            except TrainingDiverged:
                run = GridRun(lr, wd, "diverged", None, None, None, time.perf_counter() - t0)
            else:
                assert res.val_eval is not None
                run = GridRun(
                    lr,
                    wd,
                    "ok",
                    res.val_eval.accuracy,
                    res.val_eval.loss,
                    res.train_eval.accuracy,
                    res.seconds,
                )
                key = (res.val_eval.accuracy, -res.val_eval.loss)
                if best_key is None or key > best_key:
                    best, best_key = res, key
            runs.append(run)
            if on_run is not None:
                on_run(run)
    if best is None:
        raise TrainingDiverged("every grid setting diverged; try lower learning rates")
    return best, runs
