"""One training run of the paper's recipe, and evaluation with the server's preprocessing.

Jia et al., "Visual Prompt Tuning", ECCV 2022 (arXiv 2203.12119): only prompts and head receive
gradients; the frozen backbone runs in eval mode throughout (official `PromptedTransformer.train()`
keeps the encoder and embeddings in eval mode). The reported evaluation is computed with the tensors
exactly as they will be stored (cast to the artifact dtype first), through `eval_transform` and the
server's `PromptBatch`/`HeadBatch` path, so the server reproduces the trainer's predictions.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from vpt.config import ViTConfig
from vpt.train.data import EpochSampler, EvalImages, LabelledImages, TrainImages
from vpt.train.recipe import Recipe, TaskParams, make_optimizer, make_scheduler
from vpt.vit import VisionTransformer


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf (usually: the learning rate is too high for this task)."""


@dataclass
class TaskData:
    """Training and validation images plus their cached evaluation views (built once, reused by every
    grid setting)."""

    train: LabelledImages
    val: LabelledImages | None
    cfg: ViTConfig
    train_eval: EvalImages = field(init=False)
    val_eval: EvalImages | None = field(init=False)

    def __post_init__(self) -> None:
        if len(self.train) == 0:
            raise ValueError("the training set is empty")
        if self.val is not None and self.val.classes != self.train.classes:
            raise ValueError("validation classes differ from training classes")
        self.train_eval = EvalImages(self.train, self.cfg)
        self.val_eval = EvalImages(self.val, self.cfg) if self.val is not None and len(self.val) else None

    @property
    def classes(self) -> list[str]:
        return self.train.classes


@dataclass
class RunOptions:
    """How (not what) to train: device, loaders, output precision, progress display."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    workers: int = 0  # DataLoader worker processes (0 = decode/augment in the main process)
    eval_batch_size: int = 256
    save_dtype: torch.dtype = torch.float32  # dtype of the stored prompts/head; evaluation uses it too
    progress: bool = True  # tqdm bars on stderr
    desc: str = "train"  # progress bar label


@dataclass
class EvalResult:
    accuracy: float  # top-1 over all images
    loss: float  # mean cross-entropy
    predictions: list[int]  # argmax class per image, in data order
    targets: list[int]
    per_class: list[float | None]  # top-1 per class; None where a class has no images

    @property
    def count(self) -> int:
        return len(self.targets)


@dataclass
class TrainResult:
    recipe: Recipe
    prompts: Tensor  # (L_p, P, D) on the CPU, in the save dtype
    head_weight: Tensor  # (C, D)
    head_bias: Tensor  # (C,)
    trainable_params: int
    history: list[dict[str, float]]  # per epoch: loss, running train accuracy (augmented), last lr
    train_eval: EvalResult  # eval_transform over the training images
    val_eval: EvalResult | None
    seconds: float


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """bf16 autocast on CUDA (the paper trains in mixed precision); plain fp32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _loader(
    dataset: torch.utils.data.Dataset, opts: RunOptions, batch_size: int, sampler: Sampler[int] | None = None
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=opts.workers,
        persistent_workers=opts.workers > 0,
        pin_memory=opts.device.type == "cuda",
        # Its own generator: otherwise every new iterator draws a worker base seed from the global RNG,
        # which prompt dropout also uses, and results would depend on the number of workers.
        generator=torch.Generator().manual_seed(0),
    )


@torch.no_grad()
def evaluate(
    params: TaskParams, backbone: VisionTransformer, images: EvalImages, opts: RunOptions
) -> EvalResult:
    """Top-1 / loss / per-class accuracy with the server's preprocessing and batching path."""
    backbone.eval()
    preds: list[int] = []
    targets: list[int] = []
    loss_sum = 0.0
    for x, y in _loader(images, opts, opts.eval_batch_size):
        x, y = x.to(opts.device, non_blocking=True), y.to(opts.device, non_blocking=True)
        with autocast_for(opts.device):
            logits = params.logits(backbone, x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        preds += logits.argmax(dim=1).tolist()
        targets += y.tolist()
    C = len(images.data.classes)
    correct = [0] * C
    total = [0] * C
    for p, t in zip(preds, targets, strict=True):
        total[t] += 1
        correct[t] += p == t
    n = max(1, len(targets))
    return EvalResult(
        accuracy=sum(correct) / n,
        loss=loss_sum / n,
        predictions=preds,
        targets=targets,
        per_class=[c / t if t else None for c, t in zip(correct, total, strict=True)],
    )


def _check_frozen(backbone: VisionTransformer) -> None:
    # The recipe: frozen weights (no backbone gradients are computed or stored, only the activations the
    # prompts' gradients flow through) and eval mode (any dropout in the backbone stays off).
    backbone.requires_grad_(False)
    backbone.eval()


def train_task(backbone: VisionTransformer, data: TaskData, recipe: Recipe, opts: RunOptions) -> TrainResult:
    """Train prompts + head on `data.train` with `recipe`; evaluate on train and val (if any).

    Deterministic on the CPU for a given `recipe.seed` (init, shuffling, augmentation, dropout).
    Raises `TrainingDiverged` if the loss becomes non-finite.
    """
    start = time.perf_counter()
    _check_frozen(backbone)
    device = opts.device
    torch.manual_seed(recipe.seed)  # prompt dropout draws from the global generator
    gen = torch.Generator().manual_seed(recipe.seed)
    params = TaskParams(backbone.cfg, recipe, len(data.classes), gen).to(device)

    train_set = TrainImages(data.train, data.cfg, recipe.seed)
    sampler = EpochSampler(len(train_set), recipe.seed)
    loader = _loader(train_set, opts, recipe.batch_size, sampler)
    steps = len(loader)
    optimizer = make_optimizer(params, recipe)
    scheduler = make_scheduler(optimizer, recipe, steps)
    history: list[dict[str, float]] = []

    bar = tqdm(
        total=recipe.epochs * steps, desc=opts.desc, unit="step", disable=not opts.progress, leave=False
    )
    try:
        for epoch in range(recipe.epochs):
            sampler.set_epoch(epoch)
            loss_sum, correct, seen = 0.0, 0, 0
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with autocast_for(device):
                    logits = params.logits(backbone, x, dropout=recipe.dropout)
                loss = F.cross_entropy(logits.float(), y)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss became {loss.item()} in epoch {epoch + 1} (lr {recipe.lr:g}); try a lower --lr"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                loss_sum += loss.item() * y.shape[0]
                correct += (logits.argmax(1) == y).sum().item()
                seen += y.shape[0]
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
            history.append(
                {
                    "epoch": epoch + 1,
                    "loss": loss_sum / seen,
                    "train_accuracy": correct / seen,
                    "lr": optimizer.param_groups[0]["lr"],
                }
            )
    finally:
        bar.close()

    # Round to the stored dtype before evaluating, so the report describes the artifact itself.
    with torch.no_grad():
        for p in params.parameters():
            p.copy_(p.to(opts.save_dtype).to(p.dtype))
    if not all(bool(torch.isfinite(p).all()) for p in params.parameters()):
        raise TrainingDiverged(f"trained parameters are not finite (lr {recipe.lr:g}); try a lower --lr")
    train_eval = evaluate(params, backbone, data.train_eval, opts)
    val_eval = evaluate(params, backbone, data.val_eval, opts) if data.val_eval is not None else None
    return TrainResult(
        recipe=recipe,
        prompts=params.prompts.detach().to("cpu", opts.save_dtype).contiguous(),
        head_weight=params.head_weight.detach().to("cpu", opts.save_dtype).contiguous(),
        head_bias=params.head_bias.detach().to("cpu", opts.save_dtype).contiguous(),
        trainable_params=params.trainable_params(),
        history=history,
        train_eval=train_eval,
        val_eval=val_eval,
        seconds=time.perf_counter() - start,
    )
