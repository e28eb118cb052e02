"""Image preprocessing for requests: decode + the backbone's eval transform, in a thread pool.

The transform is `vpt.transforms.eval_transform`, the very function `vpt train` evaluates with
(resize the shorter side to `resize_size`, centre-crop `img_size`), so server and trainer cannot skew.
With `gpu_decode` on a CUDA device, JPEGs may instead be decoded by nvJPEG and transformed on the device
(`server.gpu_decode`: opt-in, within a few uint8 levels of this path).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from PIL import Image

from server.errors import InvalidImage
from server.gpu_decode import GpuDecoder
from server.threads import available_cpus
from vpt.config import ViTConfig
from vpt.transforms import ImageDecodeError, ImageLimits, decode_image, eval_transform

log = logging.getLogger(__name__)


class Preprocessor:
    """Args:
    cfg, limits: the backbone's config (transform sizes) and one image's byte/pixel limits.
    threads: decode threads; 0 = the CPUs this process may use.
    device, gpu_decode: decode JPEGs on `device` with nvJPEG when it is CUDA and torchvision is
        installed (`VPT_GPU_DECODE`); otherwise, or when `gpu_decode` is False, Pillow only.
    gpu_decoder: a ready decoder instead of one built from `device` (tests).
    """

    def __init__(
        self,
        cfg: ViTConfig,
        limits: ImageLimits,
        threads: int = 0,
        *,
        device: torch.device | str = "cpu",
        gpu_decode: bool = False,
        gpu_decoder: GpuDecoder | None = None,
    ) -> None:
        self.cfg, self.limits = cfg, limits
        self.threads = threads or available_cpus()
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="vpt-decode")
        if gpu_decoder is None and gpu_decode:
            gpu_decoder = GpuDecoder(device, cfg, limits)
        if gpu_decoder is not None and not gpu_decoder.available:
            log.warning("GPU JPEG decoding is off, Pillow decodes every image: %s", gpu_decoder.reason)
            gpu_decoder = None
        elif gpu_decoder is not None:
            log.info("GPU JPEG decoding on %s (nvJPEG via torchvision)", gpu_decoder.device)
        self.gpu = gpu_decoder
        # GPU decodes run one at a time (the decoder's lock): on a thread of their own, a queue of them
        # cannot park the Pillow pool's threads.
        self._gpu_pool = ThreadPoolExecutor(1, thread_name_prefix="vpt-gpu-decode") if self.gpu else None

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

    async def pixels(self, images: np.ndarray) -> torch.Tensor:
        """Raw RGB pixels uint8 (n, H, W, 3), any H and W → uint8 (n, 3, S, S), through the same
        eval transform (Pillow) as a decoded image: a PNG of these pixels gives the same tensor."""
        assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[3] == 3, images.shape
        h, w = int(images.shape[1]), int(images.shape[2])
        if h * w > self.limits.max_pixels:
            raise InvalidImage(f"images are {w}x{h} pixels, over the limit of {self.limits.max_pixels}")
        if h == 0 or w == 0:
            raise InvalidImage(f"images of {w}x{h} pixels are empty")
        return await self._pillow(list(enumerate(images)), lambda a: Image.fromarray(np.ascontiguousarray(a)))

    async def __call__(self, blobs: list[bytes]) -> torch.Tensor:
        """Encoded images → uint8 (n, 3, S, S): on the host (Pillow releases the GIL while decoding and
        resizing), or on the engine's device when the GPU decoder took any of them."""
        if self.gpu is None:
            return await self._pillow(list(enumerate(blobs)))
        loop = asyncio.get_running_loop()
        done = await loop.run_in_executor(self._gpu_pool, self.gpu.decode, blobs)
        if not done.pillow:
            assert done.images is not None
            return done.images
        host = await self._pillow([(i, blobs[i]) for i in done.pillow])
        if done.images is None:  # no JPEG went to the GPU: the Pillow path's host tensor, as without it
            return host
        return await loop.run_in_executor(self._gpu_pool, self.gpu.fill, done.images, done.pillow, host)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._gpu_pool is not None:
            self._gpu_pool.shutdown(wait=False, cancel_futures=True)
