"""An API server's shared-memory image arena: decoded images go here, and the engine core reads them in
place (a `torch` view of the same pages), so a request's pixels cross between processes without a copy
through a socket and without pickling.

The API server owns the arena and its allocator; a block is freed when the core has answered the
request that used it (RESULT or ERROR, cancelled requests included), so the core never reads a block
that was given to another request.
"""

from __future__ import annotations

import asyncio
import bisect
import os

import torch

ALIGN = 64  # blocks start on cache lines


class Arena:
    """`size` bytes of shared memory in the file `path` (tmpfs). `create`: the owner's side."""

    def __init__(self, path: str, size: int, *, create: bool) -> None:
        if create:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                # posix_fallocate, not ftruncate: a tmpfs too small fails now, not with SIGBUS later.
                os.posix_fallocate(fd, 0, size)
            except OSError:
                os.close(fd)
                os.unlink(path)
                raise
            os.close(fd)
        self.path, self.size = path, size
        self.buf = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
        self._starts: list[int] = [0]  # free blocks, sorted by start
        self._sizes: list[int] = [size]
        self._waiting: list[asyncio.Future[None]] = []  # `take`s waiting for a free block

    def view(self, offset: int, shape: tuple[int, ...]) -> torch.Tensor:
        """The uint8 tensor of `shape` at `offset`: the same memory, no copy."""
        n = 1
        for d in shape:
            n *= d
        if offset < 0 or offset + n > self.size:
            raise ValueError(f"block {offset}+{n} outside the arena of {self.size} bytes")
        return self.buf[offset : offset + n].view(shape)

    def alloc(self, nbytes: int) -> int | None:
        """A block of `nbytes` (first fit), or None when no free block is large enough."""
        need = -(-max(nbytes, 1) // ALIGN) * ALIGN
        for i, size in enumerate(self._sizes):
            if size >= need:
                start = self._starts[i]
                if size == need:
                    del self._starts[i], self._sizes[i]
                else:
                    self._starts[i] += need
                    self._sizes[i] -= need
                return start
        return None

    async def take(self, nbytes: int) -> int:
        """A block of `nbytes`, waiting for one to be freed if the arena is full."""
        if nbytes > self.size:
            raise ValueError(f"{nbytes} bytes of images exceed the arena ({self.size} bytes)")
        while (offset := self.alloc(nbytes)) is None:
            waiter = asyncio.get_running_loop().create_future()
            self._waiting.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiting:
                    self._waiting.remove(waiter)
        return offset

    def free(self, offset: int, nbytes: int) -> None:
        need = -(-max(nbytes, 1) // ALIGN) * ALIGN
        i = bisect.bisect(self._starts, offset)
        self._starts.insert(i, offset)
        self._sizes.insert(i, need)
        # Coalesce with the next block, then with the previous one.
        if i + 1 < len(self._starts) and offset + need == self._starts[i + 1]:
            self._sizes[i] += self._sizes.pop(i + 1)
            del self._starts[i + 1]
        if i > 0 and self._starts[i - 1] + self._sizes[i - 1] == offset:
            self._sizes[i - 1] += self._sizes.pop(i)
            del self._starts[i]
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            if not waiter.done():
                waiter.set_result(None)

    @property
    def free_bytes(self) -> int:
        return sum(self._sizes)
