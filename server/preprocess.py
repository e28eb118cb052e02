"""Image preprocessing for requests: decode + the backbone's eval transform, in a thread pool.

The transform is `vpt.transforms.eval_transform`, the very function `vpt train` evaluates with
(resize the shorter side to `resize_size`, centre-crop `img_size`), so server and trainer cannot skew.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import torch

from server.errors import InvalidImage
from server.threads import available_cpus
from vpt.config import ViTConfig
from vpt.transforms import ImageDecodeError, ImageLimits, decode_image, eval_transform


class Preprocessor:
    def __init__(self, cfg: ViTConfig, limits: ImageLimits, threads: int = 0) -> None:
        self.cfg, self.limits = cfg, limits
        self.threads = threads or available_cpus()
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="vpt-decode")

    def _chunk(self, start: int, blobs: list[bytes]) -> list[torch.Tensor]:
        out = []
        for i, data in enumerate(blobs, start):
            try:
                out.append(eval_transform(decode_image(data, self.limits), self.cfg))
            except ImageDecodeError as e:
                raise InvalidImage(f"image {i}: {e}") from None
        return out

    async def __call__(self, blobs: list[bytes]) -> torch.Tensor:
        """Encoded images → uint8 (n, 3, S, S). Pillow releases the GIL while decoding and resizing.

        One thread-pool job per chunk of images, not per image: each job costs the event loop a
        future and a wake-up, which dominated for the common one-image request."""
        loop = asyncio.get_running_loop()
        step = max(1, -(-len(blobs) // self.threads))  # ceil: at most `threads` chunks
        chunks = [(i, blobs[i : i + step]) for i in range(0, len(blobs), step)]
        parts = await asyncio.gather(
            *(loop.run_in_executor(self._pool, self._chunk, i, c) for i, c in chunks)
        )
        return torch.stack([t for part in parts for t in part])

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
