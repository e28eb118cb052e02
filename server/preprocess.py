"""Image preprocessing for requests: decode + the backbone's eval transform, in a thread pool.

The transform is `vpt.transforms.eval_transform`, the very function `vpt train` evaluates with
(resize the shorter side to `resize_size`, centre-crop `img_size`), so server and trainer cannot skew.
When the engine core decodes JPEGs on its CUDA device (`VPT_GPU_DECODE`), the JPEGs it may decode are
left encoded here and handed to it as bytes (`server.gpu_decode`: opt-in, within a few uint8 levels of
this path).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from server.errors import InvalidImage
from server.gpu_decode import nvjpeg_rows
from server.threads import available_cpus
from vpt.config import ViTConfig
from vpt.transforms import ImageDecodeError, ImageLimits, decode_image, eval_transform

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pixels:
    """A request's images as the engine core takes them: `images`, uint8 (m, 3, S, S) on the host, in
    request order, but for the JPEGs in `jpegs` ((position, encoded bytes), ascending), which the core
    decodes on its device (`VPT_GPU_DECODE`, `server.gpu_decode`)."""

    images: torch.Tensor
    jpegs: tuple[tuple[int, bytes], ...] = ()

    @property
    def n(self) -> int:
        return int(self.images.shape[0]) + len(self.jpegs)


class Preprocessor:
    """Args:
    cfg, limits: the backbone's config (transform sizes) and one image's byte/pixel limits.
    threads: decode threads; 0 = the CPUs this process may use.
    gpu_jpegs: leave the JPEGs nvJPEG may decode to the engine core (its `EngineInfo.gpu_decode`).
    jpeg_budget: the JPEG bytes of one request that may be left to it (None: any); the rest, Pillow's.
    """

    def __init__(
        self,
        cfg: ViTConfig,
        limits: ImageLimits,
        threads: int = 0,
        *,
        gpu_jpegs: bool = False,
        jpeg_budget: int | None = None,
    ) -> None:
        self.cfg, self.limits = cfg, limits
        self.threads = threads or available_cpus()
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="vpt-decode")
        self.gpu_jpegs, self.jpeg_budget = gpu_jpegs, jpeg_budget

    def _decoded(self, data: bytes) -> Image.Image:
        return decode_image(data, self.limits)

    def _chunk(self, items: list[tuple[int, Any]], load: Callable[[Any], Image.Image]) -> list[torch.Tensor]:
        out = []
        for i, data in items:
            try:
                out.append(eval_transform(load(data), self.cfg))
            except ImageDecodeError as e:
                raise InvalidImage(f"image {i}: {e}") from None
        return out

    async def _pillow(
        self, items: list[tuple[int, Any]], load: Callable[[Any], Image.Image] | None = None
    ) -> torch.Tensor:
        """(position, bytes) pairs → uint8 (len(items), 3, S, S) on the host; `load` turns an item
        into an RGB image (default: decode its bytes).

        One thread-pool job per chunk of images, not per image: each job costs the event loop a
        future and a wake-up, which dominated for the common one-image request."""
        loop = asyncio.get_running_loop()
        step = max(1, -(-len(items) // self.threads))  # ceil: at most `threads` chunks
        parts = await asyncio.gather(
            *(
                loop.run_in_executor(self._pool, self._chunk, items[i : i + step], load or self._decoded)
                for i in range(0, len(items), step)
            )
        )
        return torch.stack([t for part in parts for t in part])

    async def pixels(self, images: np.ndarray) -> Pixels:
        """Raw RGB pixels uint8 (n, H, W, 3), any H and W → uint8 (n, 3, S, S), through the same
        eval transform (Pillow) as a decoded image: a PNG of these pixels gives the same tensor."""
        assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[3] == 3, images.shape
        h, w = int(images.shape[1]), int(images.shape[2])
        if h * w > self.limits.max_pixels:
            raise InvalidImage(f"images are {w}x{h} pixels, over the limit of {self.limits.max_pixels}")
        if h == 0 or w == 0:
            raise InvalidImage(f"images of {w}x{h} pixels are empty")
        return Pixels(
            await self._pillow(list(enumerate(images)), lambda a: Image.fromarray(np.ascontiguousarray(a)))
        )

    async def __call__(self, blobs: list[bytes]) -> Pixels:
        """Encoded images → `Pixels`: Pillow decodes and transforms them here (it releases the GIL while
        decoding and resizing), except the JPEGs left to the core's GPU decoder."""
        if not self.gpu_jpegs:
            return Pixels(await self._pillow(list(enumerate(blobs))))
        loop = asyncio.get_running_loop()  # headers only, but up to 64 of them: off the event loop
        gpu = await loop.run_in_executor(
            self._pool, nvjpeg_rows, blobs, self.cfg, self.limits, self.jpeg_budget
        )
        picked = set(gpu)
        rest = [(i, data) for i, data in enumerate(blobs) if i not in picked]
        s = self.cfg.img_size
        host = await self._pillow(rest) if rest else torch.empty((0, 3, s, s), dtype=torch.uint8)
        return Pixels(host, tuple((i, blobs[i]) for i in gpu))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
