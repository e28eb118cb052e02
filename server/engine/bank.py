"""Device-resident prompt bank: fixed-capacity slots holding each resident task's prompts and head.

Every slot is padded to the bank's maximum prompt length and class count, so a batch gathers its
samples' prompts and heads by slot index in one indexing op (Punica / S-LoRA style for VPT). A shallow
task's slot holds its prompt tokens; a deep task's holds what its prompts give every layer, their keys
and values (`vpt.prompts.PromptKV`), derived once here when the task is installed. Slots are
reused LRU; a slot in use by a queued or running batch (refs > 0) or pinned is never evicted, and a slot
becomes visible to lookups only after its tensors are fully written — the bank never serves a
half-loaded slot. A new version of a task goes into a new slot; the old one keeps serving the requests
already bound to it and is freed when they finish.

Threading: metadata is guarded by one lock (lookups come from the scheduler's event loop); tensor
writes happen only in `install`, which the engine calls from its worker thread.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from prompt_store.artifact import TaskArtifact


class BankFull(RuntimeError):
    """Every slot is pinned or in use by in-flight work; retry once batches complete."""


class TaskTooLarge(ValueError):
    """The task exceeds the bank's per-slot limits; `field` is the artifact tensor that is too big."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class TaskKey:
    """One version of one tenant's task: the unit a slot holds."""

    tenant: str
    task_id: str
    version: int

    @property
    def task(self) -> tuple[str, str]:
        return (self.tenant, self.task_id)


@dataclass
class SlotInfo:
    """Host-side facts about a resident slot (no device sync needed to plan a batch)."""

    key: TaskKey
    prompt_length: int  # P of this task (<= bank max)
    num_classes: int  # C of this task (<= bank max)
    deep: bool  # VPT-deep (replace prompts before every layer) vs shallow
    labels: list[str]  # class names, len == num_classes
    nbytes: int  # bytes of the task's real (unpadded) tables in the bank dtype (deep: keys/values)
    refs: int = 0  # requests bound to this slot and not yet finished
    stale: bool = False  # task deleted or superseded: free when refs drops to 0


@dataclass
class BankStats:
    capacity: int  # slots
    resident: int  # slots holding a task
    allocated_bytes: int  # device bytes of the bank tables
    used_bytes: int  # real bytes of the resident tasks
    hits: int
    misses: int
    evictions: int
    loads: int


def check_fits_shape(prompt_length: int, num_classes: int, max_prompt_length: int, max_classes: int) -> None:
    """TaskTooLarge unless a task of this shape fits a bank's slots."""
    if prompt_length > max_prompt_length:
        raise TaskTooLarge(
            "prompts", f"prompt length {prompt_length} exceeds this server's limit {max_prompt_length}"
        )
    if num_classes > max_classes:
        raise TaskTooLarge("head.weight", f"{num_classes} classes exceed this server's limit {max_classes}")


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, shared: bool) -> torch.Tensor:
    if not shared:
        return torch.zeros(shape, dtype=dtype, device=device)
    # Straight into shared memory: `zeros(...).share_memory_()` would hold the table twice for a moment
    # (GBs for a large bank); the untouched `empty` pages cost nothing to copy from.
    return torch.empty(shape, dtype=dtype).share_memory_().zero_()


class PromptBank:
    def __init__(
        self,
        *,
        depth: int,
        embed_dim: int,
        prompt_kv: Callable[[torch.Tensor], torch.Tensor],
        max_slots: int,
        max_prompt_length: int,
        max_classes: int,
        device: torch.device,
        dtype: torch.dtype,
        byte_budget: int | None = None,
        shared: bool = False,
    ) -> None:
        """`prompt_kv`: a deep task's prompts (L, P, D) → their keys/values (L, P, 2D), on the
        bank's device (`VisionTransformer.prompt_kv`). `shared`: the tables live in shared memory (CPU),
        for an engine process to read."""
        elem = torch.empty((), dtype=dtype).element_size()
        capacity, slot_bytes = self.plan(
            depth, embed_dim, max_slots, max_prompt_length, max_classes, dtype, byte_budget
        )
        self.capacity = capacity
        self.depth, self.embed_dim = depth, embed_dim
        self.max_prompt_length, self.max_classes = max_prompt_length, max_classes
        self.device, self.dtype, self.elem_size = device, dtype, elem
        self.slot_bytes = slot_bytes
        S, L, P, C, D = capacity, depth, max_prompt_length, max_classes, embed_dim
        self.prompt_kv_of = prompt_kv
        self.prompts = _zeros((S, 1, P, D), dtype, device, shared)  # (S, 1, Pmax, D): shallow tasks'
        self.prompt_kv = _zeros((S, L, P, 2 * D), dtype, device, shared)  # deep tasks' keys/values
        self.head_weight = _zeros((S, C, D), dtype, device, shared)  # (S, Cmax, D)
        self.head_bias = _zeros((S, C), dtype, device, shared)  # (S, Cmax)
        self._lock = threading.Lock()
        self._slots: dict[int, SlotInfo] = {}
        self._by_key: dict[TaskKey, int] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()  # resident slots, least recently used first
        self._free = list(range(S - 1, -1, -1))
        self._pinned: set[tuple[str, str]] = set()
        self._extent: dict[int, tuple[int, int, int]] = {}  # slot → (shallow P, deep P, C) last written
        self.hits = self.misses = self.evictions = self.loads = 0

    @staticmethod
    def plan(
        depth: int,
        embed_dim: int,
        max_slots: int,
        max_prompt_length: int,
        max_classes: int,
        dtype: torch.dtype,
        byte_budget: int | None,
    ) -> tuple[int, int]:
        """(slots, bytes per slot) of a bank with these limits; its tables take their product. A slot
        holds shallow prompts (P x D), deep keys/values (L x 2 x P x D) and a head (C x D + C)."""
        elem = torch.empty((), dtype=dtype).element_size()
        prompts = (1 + 2 * depth) * max_prompt_length * embed_dim
        slot_bytes = (prompts + max_classes * embed_dim + max_classes) * elem
        capacity = max_slots if byte_budget is None else min(max_slots, byte_budget // slot_bytes)
        if capacity < 1:
            raise ValueError(
                f"bank byte budget {byte_budget} is smaller than one slot ({slot_bytes} bytes for "
                f"P<={max_prompt_length}, C<={max_classes}); raise the budget or lower the limits"
            )
        return capacity, slot_bytes

    # --- lookups (event loop) -------------------------------------------------------------------

    def lookup(self, key: TaskKey) -> int | None:
        """Slot holding exactly this version, or None. Counts a hit or a miss."""
        with self._lock:
            slot = self._by_key.get(key)
            if slot is None or self._slots[slot].stale:
                self.misses += 1
                return None
            self.hits += 1
            self._lru.move_to_end(slot)
            return slot

    def acquire(self, slot: int, n: int = 1) -> SlotInfo:
        """Bind n requests to a slot: it cannot be evicted until they are released."""
        with self._lock:
            info = self._slots[slot]
            info.refs += n
            return info

    def release(self, slot: int, n: int = 1) -> None:
        with self._lock:
            info = self._slots.get(slot)
            if info is None:
                return
            info.refs -= n
            if info.refs <= 0 and info.stale:
                self._free_slot(slot)

    def info(self, slot: int) -> SlotInfo:
        with self._lock:
            return self._slots[slot]

    def resident_versions(self, tenant: str, task_id: str) -> list[int]:
        with self._lock:
            return sorted(k.version for k, s in self._by_key.items() if k.task == (tenant, task_id))

    # --- residency management -------------------------------------------------------------------

    def pin(self, tenant: str, task_id: str) -> None:
        with self._lock:
            self._pinned.add((tenant, task_id))

    def check_fits(self, artifact: TaskArtifact) -> None:
        self.check_fits_shape(artifact.prompt_length, artifact.num_classes)

    def check_fits_shape(self, prompt_length: int, num_classes: int) -> None:
        check_fits_shape(prompt_length, num_classes, self.max_prompt_length, self.max_classes)

    def install(self, key: TaskKey, artifact: TaskArtifact) -> int:
        """Write a task into a free (or the least recently used evictable) slot; returns the slot.

        Called from the engine thread only. The slot is published after its tensors are written, and
        on CUDA the copies (and a deep task's key/value derivation) are stream-ordered before any later
        batch, so no batch sees it half-written.
        """
        self.check_fits(artifact)
        with self._lock:
            existing = self._by_key.get(key)
            if existing is not None and not self._slots[existing].stale:
                return existing
            slot = self._take_slot()
        deep = artifact.mode == "deep"
        try:
            written = self._write(slot, artifact, deep)
        except BaseException:
            with self._lock:
                self._free.append(slot)
            raise
        P, C = artifact.prompt_length, artifact.num_classes
        real = written + artifact.head_weight.numel() + artifact.head_bias.numel()
        info = SlotInfo(
            key=key,
            prompt_length=P,
            num_classes=C,
            deep=deep,
            labels=list(artifact.labels),
            nbytes=real * self.elem_size,
        )
        with self._lock:
            # Older versions of the same task stop receiving new requests; they free once drained.
            for k, s in list(self._by_key.items()):
                if k.task == key.task and k.version != key.version:
                    self._mark_stale(s)
            self._slots[slot] = info
            self._by_key[key] = slot
            self._lru[slot] = None
            self.loads += 1
        return slot

    def drop_task(self, tenant: str, task_id: str) -> None:
        """Task deleted: every resident version stops serving new requests and frees when drained."""
        with self._lock:
            for k, s in list(self._by_key.items()):
                if k.task == (tenant, task_id):
                    self._mark_stale(s)
            self._pinned.discard((tenant, task_id))

    def stats(self) -> BankStats:
        with self._lock:
            live = [i for i in self._slots.values() if not i.stale]
            return BankStats(
                capacity=self.capacity,
                resident=len(live),
                allocated_bytes=self.capacity * self.slot_bytes,
                used_bytes=sum(i.nbytes for i in live),
                hits=self.hits,
                misses=self.misses,
                evictions=self.evictions,
                loads=self.loads,
            )

    # --- internals (lock held) --------------------------------------------------------------------

    def _take_slot(self) -> int:
        if self._free:
            return self._free.pop()
        for slot in self._lru:  # least recently used first
            info = self._slots[slot]
            if info.refs == 0 and info.key.task not in self._pinned:
                self._evict(slot)
                self.evictions += 1
                return self._free.pop()
        raise BankFull(f"all {self.capacity} bank slots are pinned or in use by in-flight requests")

    def _mark_stale(self, slot: int) -> None:
        info = self._slots[slot]
        info.stale = True
        self._by_key.pop(info.key, None)
        if info.refs <= 0:
            self._free_slot(slot)

    def _evict(self, slot: int) -> None:
        info = self._slots[slot]
        self._by_key.pop(info.key, None)
        self._free_slot(slot)

    def _free_slot(self, slot: int) -> None:
        self._slots.pop(slot, None)
        self._lru.pop(slot, None)
        if slot not in self._free:
            self._free.append(slot)

    @torch.no_grad()
    def _write(self, slot: int, a: TaskArtifact, deep: bool) -> int:
        """Write a task's prompt table (shallow: its tokens; deep: their keys/values) and head into
        `slot`; returns the elements its prompt table takes."""
        P, C = a.prompt_length, a.num_classes
        P_s, P_d = (0, P) if deep else (P, 0)
        # Padding past P and C must be zeros (masked anyway, but keeps slots deterministic and finite:
        # a masked key's value still meets a zero weight): clear only what the slot's previous task
        # wrote outside the region this task overwrites — nothing at all when it is no larger, the
        # common case — not the whole slot (MBs for ViT-B).
        old_s, old_d, old_C = self._extent.get(slot, (0, 0, 0))
        if old_s > P_s:
            self.prompts[slot, :, P_s:old_s].zero_()
        if old_d > P_d:
            self.prompt_kv[slot, :, P_d:old_d].zero_()
        if old_C > C:
            self.head_weight[slot, C:old_C].zero_()
            self.head_bias[slot, C:old_C].zero_()
        self._extent[slot] = (P_s, P_d, C)
        # copy_ converts the dtype on the way (no converted temporary: one pass fewer per install).
        cuda = self.device.type == "cuda"
        written = 0
        if P_s:
            self.prompts[slot, :, :P].copy_(a.prompts, non_blocking=cuda)
            written = P * self.embed_dim
        elif P_d:
            prompts = a.prompts.to(self.device, non_blocking=cuda)
            self.prompt_kv[slot, :, :P].copy_(self.prompt_kv_of(prompts))
            written = 2 * self.depth * P * self.embed_dim
        self.head_weight[slot, :C].copy_(a.head_weight, non_blocking=cuda)
        self.head_bias[slot, :C].copy_(a.head_bias, non_blocking=cuda)
        return written
