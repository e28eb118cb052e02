"""Per-sample prompts and heads: the contract between a prompt bank and the ViT.

VPT (Jia et al., ECCV 2022, arXiv 2203.12119, Sec. 3.2) learns, per task, prompt tokens that are
inserted after the CLS token (shallow: before layer 0 only; deep: a fresh set before every layer) and a
linear head on the final CLS feature. The official code broadcasts one task's prompts to the whole
batch; here every sample names a row of a prompt table (a bank slot), like Punica/S-LoRA do for LoRA,
so one forward pass serves many tasks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PromptBatch:
    """Which prompts each sample of a batch gets.

    Shallow tasks use layer 0 of their table row only; deep tasks use layers 0..L-1. Rows are padded
    with zeros past a task's prompt length; the attention mask hides the padding.
    """

    table: Tensor  # (S, L_t, P_t, D) prompt table (a bank, or one task's prompts with S=1); L_t is 1 or depth
    index: Tensor  # (B,) long, on table's device: the table row each sample uses
    lengths: Tensor  # (B,) long, on table's device: real prompt tokens of each sample (<= P_t)
    deep: Tensor  # (B,) bool, on table's device: True → replace prompt positions before every layer >= 1
    max_len: int  # host copy of lengths.max(): the batch's padded prompt length (no device sync needed)
    uniform: bool  # host flag: every sample has max_len tokens → no attention mask (fast SDPA kernels)
    any_deep: bool  # host flag: some sample is deep → layers >= 1 gather from the table
    all_deep: bool  # host flag: every sample is deep → replacement needs no per-sample select
    dropout: float = 0.0  # prompt dropout probability (training only; VPT uses 0.1 for deep)

    @classmethod
    def build(
        cls,
        table: Tensor,
        index: Tensor,
        lengths: Tensor | list[int],
        deep: Tensor | list[bool],
        dropout: float = 0.0,
    ) -> PromptBatch:
        """Build from host lists or tensors; computes the host flags (one sync if tensors are on a GPU)."""
        deep_l = [bool(v) for v in (deep.tolist() if isinstance(deep, Tensor) else deep)]
        rows = _Rows.of(table.device, table.shape[2], index, lengths)
        if len(deep_l) != index.shape[0]:
            raise ValueError("index, lengths and deep must have one entry per sample")
        return cls(
            table=table,
            index=rows.index,
            lengths=rows.lengths,
            deep=torch.tensor(deep_l, dtype=torch.bool).to(table.device, non_blocking=True),
            max_len=rows.max_len,
            uniform=rows.uniform,
            any_deep=any(d and n > 0 for d, n in zip(deep_l, rows.host_lengths, strict=True)),
            all_deep=all(deep_l),
            dropout=dropout,
        )

    @classmethod
    def single_task(cls, prompts: Tensor, batch_size: int, deep: bool, dropout: float = 0.0) -> PromptBatch:
        """One task's prompts (L_p, P, D) broadcast to a batch, as the official code does."""
        index = torch.zeros(batch_size, dtype=torch.long, device=prompts.device)
        P = prompts.shape[1]
        return cls.build(prompts.unsqueeze(0), index, [P] * batch_size, [deep] * batch_size, dropout)

    def layer(self, i: int) -> Tensor:
        """(B, max_len, D) prompt tokens of layer i for every sample."""
        p = self.table[self.index, i, : self.max_len]
        if self.dropout > 0:
            p = torch.nn.functional.dropout(p, self.dropout, training=True)
        return p


@dataclass(frozen=True)
class _Rows:
    """Per-sample table rows and prompt lengths on the table's device, with their host facts."""

    index: Tensor
    lengths: Tensor
    host_lengths: list[int]
    max_len: int
    uniform: bool

    @classmethod
    def of(cls, device: torch.device, slots: int, index: Tensor, lengths: Tensor | list[int]) -> _Rows:
        host = [int(v) for v in (lengths.tolist() if isinstance(lengths, Tensor) else lengths)]
        if len(host) != index.shape[0]:
            raise ValueError("index and lengths must have one entry per sample")
        max_len = max(host, default=0)
        if max_len > slots:
            raise ValueError(f"prompt length {max_len} exceeds the table's {slots} slots")
        return cls(
            index=index.to(device, non_blocking=True),
            # Built on the host and copied without blocking: torch.tensor(..., device=cuda) would wait
            # for every queued kernel (a synchronous copy), stalling the pipelined engine each batch.
            lengths=torch.tensor(host, dtype=torch.long).to(device, non_blocking=True),
            host_lengths=host,
            max_len=max_len,
            uniform=all(v == max_len for v in host),
        )


@dataclass
class PromptKV:
    """VPT-deep prompts as what the image tokens see of them: each layer's keys and values (inference).

    In VPT-deep (Jia et al. 2022, Sec. 3.2) the tokens entering layer i at the prompt positions are the
    task's `prompts[i]`, and what the block outputs there is discarded (replaced before the next layer;
    after the last only CLS is read). So a deep prompt token is never needed as a query nor through the
    MLP: the image tokens only ever attend to its key and value, `qkv_i(LN1_i(prompts[i]))`, a function
    of the task alone (`VisionTransformer.prompt_kv`, made once per task). A deep sample's sequence is
    then CLS + patches, and each layer attends over its task's prompt keys/values plus its own —
    prefix-tuning's key/value prefix (Li & Liang 2021), computed from VPT's prompts: the same numbers as
    the full forward. Training keeps the token path (`PromptBatch`): it needs gradients through them.
    """

    table: Tensor  # (S, L, P_t, 2D) keys/values table, per position [k; v]; zeros past a task's P
    index: Tensor  # (B,) long, on table's device: the table row each sample uses
    lengths: Tensor  # (B,) long, on table's device: real prompt tokens of each sample (<= P_t)
    max_len: int  # host copy of lengths.max(): the batch's padded prompt length
    uniform: bool  # host flag: every sample has max_len tokens → no attention mask

    @classmethod
    def build(cls, table: Tensor, index: Tensor, lengths: Tensor | list[int]) -> PromptKV:
        """Build from host lists or tensors (one sync if `lengths` is on a GPU)."""
        rows = _Rows.of(table.device, table.shape[2], index, lengths)
        return cls(table, rows.index, rows.lengths, rows.max_len, rows.uniform)

    def extend(self, i: int, kv: Tensor) -> Tensor:
        """Layer i's keys and values for every sample: its task's prompt keys/values, then the tokens'
        own `kv` (B, T, 2D) → (B, max_len + T, 2D).

        Gathered straight into one buffer (index_select's `out`), token-major like `qkv`'s output, so
        every copy moves whole rows: a gather then a concatenation in (B, nh, T, hd) layout copied the
        prompts twice through strided views, 13 % of the forward on CPU (vit_test_tiny, B=64, P=50)."""
        P = self.max_len
        out = kv.new_empty(kv.shape[0], P + kv.shape[1], kv.shape[2])
        torch.index_select(self.table[:, i, :P], 0, self.index, out=out[:, :P])
        out[:, P:] = kv
        return out


@dataclass
class HeadBatch:
    """Which linear head each sample gets; class counts may differ, padded classes score -inf."""

    weight: Tensor  # (S, C_t, D) head table
    bias: Tensor  # (S, C_t)
    index: Tensor  # (B,) long: the table row each sample uses
    num_classes: Tensor | None = None  # (B,) long real classes per sample; None → all C_t are real

    def __call__(self, features: Tensor) -> Tensor:
        """features (B, D) → logits (B, C_t)."""
        w = self.weight[self.index]  # (B, C_t, D)
        logits = torch.bmm(w, features.unsqueeze(-1)).squeeze(-1) + self.bias[self.index]  # (B, C_t)
        if self.num_classes is not None:
            cls_pos = torch.arange(logits.shape[1], device=logits.device)
            logits = logits.masked_fill(cls_pos[None, :] >= self.num_classes[:, None], float("-inf"))
        return logits
