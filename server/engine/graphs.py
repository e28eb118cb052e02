"""CUDA graphs for small batches: one captured ViT forward per (batch size, prompt length, kind) bucket.

At batch 1 a ViT-B/16 forward is ~200 small kernels; launching them one by one from Python takes
longer than an H100 takes to run them, so batch-1 latency is CPU-bound. A CUDA graph replays the
whole forward with one launch (vLLM and TGI do the same for their small decode batches).

A graph has static shapes and reads static buffers, so a batch is padded up to the next captured batch
size (padding rows: slot 0, no prompt tokens) and its prompts up to the next prompt-length bucket,
always through the masked path of `VisionTransformer.forward_features`: each sample attends to its
CLS token, its own prompts and the patches, exactly as in its solo eager run (VPT, Jia et al. 2022,
Sec. 3.2), so results agree with eager mode up to floating-point reordering. Two kinds per size: deep
only (prompts as per-layer keys/values: a bucket pads keys only, never queries) and any mix (shallow
prompts as tokens, deep ones as keys/values, each masked where a sample has none). Padding rows never
touch real ones: every op of a ViT is per sample. The bank's tables are read in
place, so a task installed after capture is seen by every replay (the bank never reallocates them).

`FeatureGraphs(capture=False)` runs the same padded forward eagerly, on any device: it is how the
padding semantics are tested without a GPU.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from vpt.prompts import PromptBatch, PromptKV
from vpt.vit import VisionTransformer

if TYPE_CHECKING:
    from server.engine.batch import BankTables

log = logging.getLogger(__name__)


def buckets(limit: int) -> list[int]:
    """Powers of two below `limit`, then `limit`: 8 → [1, 2, 4, 8]; 50 → [1, 2, 4, ..., 32, 50]."""
    out, b = [], 1
    while b < limit:
        out.append(b)
        b *= 2
    return [*out, limit] if limit >= 1 else []


@dataclass
class _Static:
    """One bucket's input/output buffers (and its graph once captured)."""

    x: Tensor  # (B, 3, S, S) normalised images, model dtype
    rows: Tensor  # (3, B) long: bank slot, prompt tokens (shallow), prompt keys/values (deep) of each row
    out: Tensor | None = None  # (B, D) CLS features, written by each run
    graph: torch.cuda.CUDAGraph | None = None


class FeatureGraphs:
    """Padded static forwards `(images, slots, lengths, deep) -> CLS features` for batch sizes up to
    `max_batch` and prompt lengths up to the bank's, deep-only or mixed, captured as CUDA graphs when
    `capture`."""

    def __init__(self, model: VisionTransformer, bank: BankTables, max_batch: int, capture: bool) -> None:
        self.model, self.bank, self.capture = model, bank, capture
        self.batch_sizes = buckets(max_batch)
        self.prompt_lengths = buckets(bank.prompts.shape[2])
        self.device, self.dtype = bank.prompts.device, model.pos_embed.dtype
        self._static: dict[tuple[int, int, bool], _Static] = {}
        self._inputs: dict[int, tuple[Tensor, Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None

    def fits(self, n: int, max_len: int) -> tuple[int, int] | None:
        """The bucket a batch of `n` samples with prompts up to `max_len` runs in, or None (eager)."""
        b = next((s for s in self.batch_sizes if s >= n), None)
        p = next((s for s in self.prompt_lengths if s >= max(max_len, 1)), None)
        return None if b is None or p is None else (b, p)

    def _forward(self, st: _Static, P: int, deep_only: bool) -> Tensor:
        # Always masked (uniform=False): the mask is what makes padding invisible.
        kv = PromptKV(self.bank.prompt_kv, index=st.rows[0], lengths=st.rows[2], max_len=P, uniform=False)
        prompts = None
        if not deep_only:
            prompts = PromptBatch(
                table=self.bank.prompts,
                index=st.rows[0],
                lengths=st.rows[1],
                deep=st.rows[1] < 0,  # never read: shallow prompts are tokens, deep ones keys/values
                max_len=P,
                uniform=False,
                any_deep=False,
                all_deep=False,
            )
        tokens = self.model.forward_features(st.x, prompts, kv=kv, cls_only=True)
        # contiguous: the (B, D) copy is all a graph keeps of its tokens; the rest goes back to the pool.
        return self.model.pool(tokens).contiguous()

    def _buffers(self, B: int) -> _Static:
        """A bucket's own record over the input buffers of its batch size, shared by every prompt
        and mode bucket of that size: batches fill them in stream order, after the previous replay
        read them."""
        if B not in self._inputs:
            S = self.model.cfg.img_size
            x = torch.zeros(B, 3, S, S, dtype=self.dtype, device=self.device)
            self._inputs[B] = (x, torch.zeros(3, B, dtype=torch.long, device=self.device))
        x, rows = self._inputs[B]
        return _Static(x=x, rows=rows)

    @torch.inference_mode()
    def prepare(self) -> None:
        """Allocate every bucket (and capture its graph, largest first so smaller ones reuse the
        memory pool), then check each replay against the eager forward on the same buffers."""
        t0 = time.perf_counter()
        side = torch.cuda.Stream(self.device) if self.capture else None
        for B in reversed(self.batch_sizes):
            for P in reversed(self.prompt_lengths):
                for deep_only in (True, False):
                    st = self._buffers(B)
                    if side is not None:
                        self._capture(st, P, deep_only, side)
                    self._static[(B, P, deep_only)] = st
        if self.capture:
            self._check()
        log.info(
            "%s %d static forwards (batch %s x prompts %s x deep-only/mixed) in %.2fs",
            "captured" if self.capture else "prepared",
            len(self._static),
            self.batch_sizes,
            self.prompt_lengths,
            time.perf_counter() - t0,
        )

    def _capture(self, st: _Static, P: int, deep_only: bool, side: torch.cuda.Stream) -> None:
        # Warm up on a side stream first (cuBLAS/SDPA workspaces, lazy init), as torch.cuda.graphs asks.
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(st, P, deep_only)
        torch.cuda.current_stream(self.device).wait_stream(side)
        st.graph = torch.cuda.CUDAGraph()
        # thread_local: loader threads may copy tasks into the bank meanwhile; that is not capture.
        with torch.cuda.graph(st.graph, pool=self._pool, capture_error_mode="thread_local"):
            st.out = self._forward(st, P, deep_only)

    def _check(self) -> None:
        """Replay vs eager on random inputs in the same buffers: the same, or graphs are not used."""
        gen = torch.Generator(device="cpu").manual_seed(0)
        for (B, P, deep_only), st in self._static.items():
            x = torch.randn(B, 3, st.x.shape[2], st.x.shape[3], generator=gen)
            lengths = torch.randint(0, P + 1, (B,), generator=gen)
            is_deep = (
                torch.ones(B, dtype=torch.bool)
                if deep_only
                else torch.randint(0, 2, (B,), generator=gen).bool()
            )
            rows = torch.stack(
                [
                    torch.randint(0, self.bank.prompts.shape[0], (B,), generator=gen),
                    lengths.masked_fill(is_deep, 0),
                    lengths.masked_fill(~is_deep, 0),
                ]
            )
            st.x.copy_(x)
            st.rows.copy_(rows)
            assert st.graph is not None and st.out is not None
            st.graph.replay()
            replayed = st.out.clone()
            eager = self._forward(st, P, deep_only)
            # Relative to the whole output: kernels chosen under capture may round differently in the
            # last bit (bf16), while a replay that read stale or wrong buffers is off by O(1).
            err = ((replayed.float() - eager.float()).norm() / eager.float().norm().clamp_min(1e-12)).item()
            if not err < 1e-2:
                raise RuntimeError(
                    f"CUDA graph (batch {B}, prompts {P}, {'deep' if deep_only else 'mixed'}) differs "
                    f"from eager: relative error {err:.3g}"
                )

    @torch.inference_mode()
    def run(self, x: Tensor, slots: list[int], lengths: list[int], deep: list[bool]) -> Tensor | None:
        """(n, D) CLS features of normalised images `x` (n, 3, S, S), or None when the batch fits no
        bucket (larger than `max_batch`): the caller runs it eagerly.

        The result is the bucket's output buffer: enqueue every read of it on this stream before the
        next `run` of *any* bucket (they share one memory pool, so another bucket's replay may reuse
        its memory), as `CudaExecutor` does."""
        n = x.shape[0]
        key = self.fits(n, max(lengths, default=0))
        if key is None:
            return None
        B, P = key
        deep_only = all(deep)
        st = self._static[(B, P, deep_only)]
        pad = B - n
        st.x[:n].copy_(x)
        # Padding rows: slot 0, no prompts; their (stale) images are never read by real rows.
        tokens = [0 if d else m for m, d in zip(lengths, deep, strict=True)]
        kv = [m if d else 0 for m, d in zip(lengths, deep, strict=True)]
        rows = [slots + [0] * pad, tokens + [0] * pad, kv + [0] * pad]
        st.rows.copy_(torch.tensor(rows), non_blocking=True)  # staged at once: no device sync
        if st.graph is not None:
            st.graph.replay()
        else:
            st.out = self._forward(st, P, deep_only)
        assert st.out is not None
        return st.out[:n]
