"""`vpt train`: the VPT paper's recipe (Jia et al., ECCV 2022, arXiv 2203.12119) from labelled images
to a validated task artifact. See docs/training.md.

- `data`: ImageFolder / CSV reading, decode-once caching, splits, train/eval views;
- `recipe`: hyper-parameters, trainable params and their init, optimiser and schedule;
- `loop`: one run and the evaluation (the server's preprocessing and batching path);
- `grid`: lr × weight-decay search on validation;
- `report`: the summary stored in the artifact and printed;
- `job`: the whole command (load backbone, data, train, validate, write).
"""

from vpt.train.data import DatasetError, LabelledImages, load_labelled_images, stratified_split
from vpt.train.grid import GridRun, grid_search
from vpt.train.loop import (
    EvalResult,
    RunOptions,
    TaskData,
    TrainingDiverged,
    TrainResult,
    evaluate,
    train_task,
)
from vpt.train.recipe import MODES, PAPER_LR_GRID, PAPER_WD_GRID, Recipe, TaskParams

__all__ = [
    "MODES",
    "PAPER_LR_GRID",
    "PAPER_WD_GRID",
    "DatasetError",
    "EvalResult",
    "GridRun",
    "LabelledImages",
    "Recipe",
    "RunOptions",
    "TaskData",
    "TaskParams",
    "TrainResult",
    "TrainingDiverged",
    "evaluate",
    "grid_search",
    "load_labelled_images",
    "stratified_split",
    "train_task",
]
