"""Image preprocessing for requests: decode + the backbone's eval transform, in a thread pool.

The transform is `vpt.transforms.eval_transform`, the very function `vpt train` evaluates with
(resize the shorter side to `resize_size`, centre-crop `img_size`), so server and trainer cannot skew.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from server.errors import InvalidImage
from vpt.config import ViTConfig
from vpt.transforms import ImageDecodeError, ImageLimits, decode_image, eval_transform


class Preprocessor:
    def __init__(self, cfg: ViTConfig, limits: ImageLimits, threads: int = 0) -> None:
        self.cfg, self.limits = cfg, limits
        self._pool = ThreadPoolExecutor(threads or os.cpu_count() or 1, thread_name_prefix="vpt-decode")

    def _one(self, i: int, data: bytes) -> torch.Tensor:
        try:
            return eval_transform(decode_image(data, self.limits), self.cfg)
        except ImageDecodeError as e:
            raise InvalidImage(f"image {i}: {e}") from None

    async def __call__(self, blobs: list[bytes]) -> torch.Tensor:
        """Encoded images → uint8 (n, 3, S, S). Pillow releases the GIL while decoding and resizing."""
        loop = asyncio.get_running_loop()
        tensors = await asyncio.gather(
            *(loop.run_in_executor(self._pool, self._one, i, b) for i, b in enumerate(blobs))
        )
        return torch.stack(tensors)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
