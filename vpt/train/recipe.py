"""The paper's training recipe: what is trained, how it is initialised, optimiser and schedule.

Jia et al., "Visual Prompt Tuning", ECCV 2022 (arXiv 2203.12119), Sec. 4 and Appendix A, and the
official code (KMnP/vpt: `src/models/vit_prompt/vit.py`, `src/models/mlp.py`, `src/solver/*.py`,
`tune_fgvc.py`):
- only the prompts and the linear head are trained; the backbone is frozen and stays in eval mode;
- prompts ~ U(-v, v), v = sqrt(6 / (3·patch² + D)) (Xavier-uniform over the patch projection);
- head: kaiming-normal (fan_out) weight; the official bias is a constant (-log 99, "special bias"),
  which softmax cross-entropy cannot tell from zero, so we start it at zero;
- SGD with momentum 0.9, cross-entropy, cosine decay after a linear warm-up;
- the learning rate is given as a base rate scaled by batch_size / 256 (`tune_fgvc.py`);
- weight decay on prompts and head weight, none on the head bias (`src/solver/optimizer.py`);
- prompt dropout 0.1 for deep prompts (the paper's demo), 0 for shallow.
- lr / weight-decay grids: lr {50, 25, 10, 5, 2.5, 1, 0.5, 0.25, 0.1, 0.05}, wd {0.01, 0.001, 0.0001, 0}
  (`tune_fgvc.py`), chosen on a validation split.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from vpt.config import ViTConfig
from vpt.prompts import HeadBatch, PromptBatch
from vpt.vit import VisionTransformer

Mode = Literal["shallow", "deep", "linear"]
MODES: tuple[Mode, ...] = ("shallow", "deep", "linear")

PAPER_LR_GRID: tuple[float, ...] = (50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05)
PAPER_WD_GRID: tuple[float, ...] = (0.01, 0.001, 0.0001, 0.0)


@dataclass(frozen=True)
class Recipe:
    """Hyper-parameters of one training run (defaults: the paper's, see module docstring)."""

    mode: Mode = "deep"  # VPT-deep (the paper's main method), VPT-shallow, or a linear probe (no prompts)
    prompt_length: int = 10  # P tokens per layer; ignored (0) for "linear"
    epochs: int = 100  # the paper trains 100 epochs (configs/base-prompt.yaml)
    batch_size: int = 128  # base-prompt.yaml; lr is scaled by batch_size / 256
    base_lr: float = 1.0  # lr at batch 256; the effective lr is base_lr * batch_size / 256
    weight_decay: float = 1e-4  # SOLVER.WEIGHT_DECAY default of the official code
    warmup_epochs: int = 10  # base-prompt.yaml
    momentum: float = 0.9
    prompt_dropout: float | None = None  # None → 0.1 for deep, 0 otherwise
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode != "linear" and self.prompt_length < 1:
            raise ValueError(f"{self.mode} prompt tuning needs --prompt-length >= 1")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch size must be >= 1")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(f"warm-up epochs must be in 0..epochs ({self.epochs}), got {self.warmup_epochs}")
        if self.base_lr <= 0 or self.weight_decay < 0:
            raise ValueError("lr must be > 0 and weight decay >= 0")
        if self.prompt_dropout is not None and not 0 <= self.prompt_dropout < 1:
            raise ValueError(f"prompt dropout must be in [0, 1), got {self.prompt_dropout}")

    @property
    def lr(self) -> float:
        """Effective SGD learning rate: base lr scaled linearly with the batch (tune_fgvc.py)."""
        return self.base_lr * self.batch_size / 256

    @property
    def dropout(self) -> float:
        if self.prompt_dropout is not None:
            return self.prompt_dropout if self.mode != "linear" else 0.0
        return 0.1 if self.mode == "deep" else 0.0

    @property
    def num_prompts(self) -> int:
        return 0 if self.mode == "linear" else self.prompt_length

    @property
    def deep(self) -> bool:
        return self.mode == "deep"

    @property
    def artifact_mode(self) -> Literal["shallow", "deep"]:
        """A linear probe is stored as a shallow task with P = 0 (the artifact format's convention)."""
        return "deep" if self.mode == "deep" else "shallow"

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["lr"] = self.lr
        d["prompt_dropout"] = self.dropout
        return d


class TaskParams(nn.Module):
    """The trainable part of a task: prompts (L_p, P, D) and a linear head (C, D) + (C,)."""

    def __init__(self, cfg: ViTConfig, recipe: Recipe, num_classes: int, generator: torch.Generator) -> None:
        super().__init__()
        L_p = cfg.depth if recipe.deep else 1
        v = cfg.prompt_init_bound
        prompts = torch.empty(L_p, recipe.num_prompts, cfg.embed_dim)  # (L_p, P, D)
        nn.init.uniform_(prompts, -v, v, generator=generator)
        self.prompts = nn.Parameter(prompts, requires_grad=recipe.num_prompts > 0)
        weight = torch.empty(num_classes, cfg.embed_dim)  # (C, D)
        nn.init.kaiming_normal_(weight, a=0, mode="fan_out", generator=generator)
        self.head_weight = nn.Parameter(weight)
        self.head_bias = nn.Parameter(torch.zeros(num_classes))  # (C,)
        self.deep = recipe.deep

    @classmethod
    def from_tensors(cls, prompts: Tensor, head_weight: Tensor, head_bias: Tensor, deep: bool) -> TaskParams:
        """Wrap stored tensors (e.g. a loaded artifact's) for `logits` / `loop.evaluate`; frozen, fp32."""
        obj = cls.__new__(cls)
        nn.Module.__init__(obj)
        obj.prompts = nn.Parameter(prompts.detach().float().clone(), requires_grad=False)  # (L_p, P, D)
        obj.head_weight = nn.Parameter(head_weight.detach().float().clone(), requires_grad=False)  # (C, D)
        obj.head_bias = nn.Parameter(head_bias.detach().float().clone(), requires_grad=False)  # (C,)
        obj.deep = deep
        return obj

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def logits(self, backbone: VisionTransformer, images: Tensor, dropout: float = 0.0) -> Tensor:
        """uint8 images (B, 3, S, S) → logits (B, C), through the same PromptBatch/HeadBatch the server
        uses. A linear probe needs no gradient through the backbone, so it runs it under no_grad."""
        B = images.shape[0]
        x = backbone.normalize(images)
        zeros = torch.zeros(B, dtype=torch.long, device=images.device)
        heads = HeadBatch(self.head_weight.unsqueeze(0), self.head_bias.unsqueeze(0), zeros)
        if self.prompts.shape[1] == 0:
            with torch.no_grad():
                feats = backbone(x)  # (B, D)
            return heads(feats)
        prompts = PromptBatch.single_task(self.prompts, B, deep=self.deep, dropout=dropout)
        return backbone(x, prompts, heads)


def make_optimizer(params: TaskParams, recipe: Recipe) -> torch.optim.SGD:
    """SGD + momentum; no weight decay on the head bias, as the official `make_optimizer`."""
    groups = [
        {"params": [p for p in (params.prompts, params.head_weight) if p.requires_grad]},
        {"params": [params.head_bias], "weight_decay": 0.0},
    ]
    return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR factor at optimiser step `step` (0-based): linear warm-up, then half-cosine to zero.

    The official `WarmupCosineSchedule` is stepped once per epoch and starts at factor 0, which wastes
    the whole first epoch; we step it per batch and count from step + 1, so no update has lr 0 and the
    factor reaches 1 exactly at the end of warm-up.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer, recipe: Recipe, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    warm, total = recipe.warmup_epochs * steps_per_epoch, recipe.epochs * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, warm, total))
