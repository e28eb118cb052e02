"""Test hooks (issue D, faults): a simulated device out-of-memory on large batches, a failing batch.

Counted where batches start, in the order the engine starts them: the engine thread, or the engine
process (so the N-th batch is the same one either way, overtakers included).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Faults:
    oom_over: int = 0  # batches of more images raise torch.OutOfMemoryError
    fail_every: int = 0  # every N-th batch raises RuntimeError
    started: int = field(default=0, init=False)

    def __bool__(self) -> bool:
        return bool(self.oom_over or self.fail_every)

    def check(self, images: int) -> None:
        """Count a batch of `images` starting; raise its injected failure, if any."""
        self.started += 1
        if self.oom_over and images > self.oom_over:
            raise torch.OutOfMemoryError(f"injected: batch of {images} > {self.oom_over}")
        if self.fail_every and self.started % self.fail_every == 0:
            raise RuntimeError(f"injected engine failure on batch {self.started}")
