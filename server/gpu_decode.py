"""Optional GPU JPEG decoding (issue H, point 4): nvJPEG through `torchvision.io.decode_jpeg`.

Off by default (`VPT_GPU_DECODE`): nvJPEG's IDCT and chroma upsampling, and the float resize of
`vpt.transforms.eval_transform_tensor`, differ from Pillow's (the trainer's transform) by a few uint8
levels. When on, the JPEGs of a request that nvJPEG decodes exactly as Pillow would (same pixels up to
that rounding, same orientation, same geometry) are decoded in one batched call on the engine's device
and transformed there; everything else takes the Pillow path (`server.preprocess`):
- not a JPEG, or not a plain one (MPO, 12-bit, CMYK/YCCK or any mode but RGB and L): Pillow converts;
- EXIF orientation other than 1: Pillow applies it (`ImageOps.exif_transpose`), nvJPEG would not;
- aspect ratio over `MAX_EXACT_ASPECT`: Pillow resamples only the cropped region of those;
- shorter side under `MIN_DOWNSCALE` x the eval transform's resize side: pixel for pixel, nvJPEG's
  output differs from libjpeg-turbo's (Pillow's) on sharp colour detail, and only a downscale averages
  that away (H200, photo-like JPEGs against Pillow: a 37x37 one not resized, 2.6 levels on average and
  14 at most; downscaled 2.4-28x, 0.05-0.4 on average and 2 at most). Such small images cost Pillow
  little; the large ones, where nvJPEG pays, are downscaled far more;
- bytes after the end-of-image marker, or none: Pillow refuses truncated JPEGs with a 400, nvJPEG
  might decode them leniently; trailing data is rare enough to leave to Pillow too;
- any image nvJPEG refuses: Pillow decodes it or reports the precise error.
Limits are checked from the header with `vpt.transforms.open_image`, as the Pillow path does, so a
refused image gets the same 400 whichever path it was headed for. `torchvision` is imported lazily:
without it (or without CUDA) the decoder reports itself unavailable, with the reason.

CUDA streams. nvJPEG's hardware decoder may write its output before work already queued on its stream
has run (pytorch/vision#9606, meta-pytorch/torchcodec#1634): an output block the caching allocator
just recycled from the engine's stream could be overwritten while a forward pass still reads it. So
decoding runs on a stream of its own (the allocator keeps blocks per stream), one request at a time
(a lock), and each call waits for its stream before it returns; the output tensor is recorded on the
default stream, where the engine reads it, so its block is not reused before the engine is done.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from PIL import ExifTags, Image

from server.errors import InvalidImage
from vpt.config import ViTConfig
from vpt.transforms import (
    MAX_EXACT_ASPECT,
    ImageDecodeError,
    ImageLimits,
    eval_sizes,
    eval_transform_tensor,
    open_image,
)

log = logging.getLogger(__name__)

JPEG_SOI = b"\xff\xd8\xff"  # start of image + the first marker's 0xFF
JPEG_EOI = b"\xff\xd9"  # end of image
# nvJPEG decodes a JPEG only if the eval transform shrinks it at least this much (module docstring).
MIN_DOWNSCALE = 2

# Encoded JPEGs (uint8 CPU tensors) → decoded uint8 (3, H, W) tensors on the device, RGB.
DecodeJpegs = Callable[[list[torch.Tensor], torch.device], list[torch.Tensor]]


def gpu_ineligible(data: bytes, limits: ImageLimits, min_side: int = 0) -> str | None:
    """Why these bytes must take the Pillow path, or None when nvJPEG may decode them.

    `min_side`: JPEGs whose shorter side is smaller go to Pillow (see `MIN_DOWNSCALE`).

    Pure and cheap: reads the magic bytes, then the header only (no pixel is decoded). Raises
    `ImageDecodeError` for images the server refuses anyway (over the byte or pixel limit, unreadable
    header), with `decode_image`'s messages."""
    if not data.startswith(JPEG_SOI):
        return "not a JPEG"
    img = open_image(data, limits)
    if img.format != "JPEG":
        return f"{img.format} file"  # MPO: Pillow picks the first frame
    if img.mode not in ("RGB", "L") or getattr(img, "bits", 8) != 8:
        return f"mode {img.mode} ({getattr(img, 'bits', 8)} bits)"
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # unreadable EXIF: Pillow's exif_transpose decides what it means
        return "unreadable EXIF"
    if orientation != 1:
        return f"EXIF orientation {orientation}"
    w, h = img.size
    if max(w, h) > MAX_EXACT_ASPECT * min(w, h):
        return f"aspect ratio of {w}x{h} over {MAX_EXACT_ASPECT}"
    if min(w, h) < min_side:
        return f"{w}x{h} is not downscaled enough (shorter side under {min_side})"
    if not data.endswith(JPEG_EOI):
        return "no end-of-image marker at the end (truncated, or trailing data)"
    return None


@dataclass
class GpuDecoded:
    images: torch.Tensor | None  # (n, 3, S, S) uint8 on the device; rows in `pillow` not yet written
    pillow: list[int]  # request positions left to Pillow (ineligible, or refused by nvJPEG), ascending


class GpuDecoder:
    """Decodes a request's eligible JPEGs on the engine's CUDA device (see the module docstring).

    Args:
        device: the engine's device; anything but CUDA makes the decoder unavailable.
        cfg: the backbone's config (image and resize sizes of the eval transform).
        limits: the byte and pixel limits of one image (the Pillow path's).
        decode_jpegs: the batched decoder; default torchvision's nvJPEG `decode_jpeg`, probed once here.
            Given (tests), it is used on any device without a probe.
    """

    def __init__(
        self,
        device: torch.device | str,
        cfg: ViTConfig,
        limits: ImageLimits,
        decode_jpegs: DecodeJpegs | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.cfg, self.limits = cfg, limits
        self._min_side = MIN_DOWNSCALE * eval_sizes(cfg)[0]  # smaller JPEGs: Pillow's (module docstring)
        self._decode_jpegs = decode_jpegs
        self._lock = threading.Lock()  # one decode at a time on the stream (see module docstring)
        self._stream: torch.cuda.Stream | None = None
        if self.device.type == "cuda" and torch.cuda.is_available():
            self._stream = torch.cuda.Stream(self.device)
        # Why the decoder cannot be used (None: it can).
        self.reason: str | None = None if decode_jpegs is not None else self._probe()

    @property
    def available(self) -> bool:
        return self.reason is None

    def _probe(self) -> str | None:
        if self.device.type != "cuda":
            return f"the device is {self.device.type}, not CUDA"
        if self._stream is None:
            return "CUDA is not available"
        try:
            import torchvision.io as tvio
        except Exception as e:  # ImportError, or a torchvision built for another torch
            return f"torchvision is not importable ({type(e).__name__}: {e})"

        def decode(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
            return tvio.decode_jpeg(tensors, mode=tvio.ImageReadMode.RGB, device=device)

        buf = io.BytesIO()
        Image.new("RGB", (24, 16), (200, 100, 50)).save(buf, "JPEG")
        try:  # also proves list input (torchvision >= 0.19) and a CUDA build with nvJPEG
            with self._on_stream():
                out = decode([torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)], self.device)
            if len(out) != 1 or out[0].shape != (3, 16, 24) or out[0].device.type != "cuda":
                raise RuntimeError(f"unexpected output {[(t.shape, t.device) for t in out]}")
        except Exception as e:
            return f"torchvision.io.decode_jpeg cannot decode on {self.device}: {e}"
        self._decode_jpegs = decode
        return None

    @contextlib.contextmanager
    def _on_stream(self) -> Iterator[None]:
        """Device work under the lock on the decoder's stream, finished before the lock is released."""
        with self._lock:
            if self._stream is None:
                yield
                return
            try:
                with torch.cuda.stream(self._stream):
                    yield
            finally:
                self._stream.synchronize()

    def decode(self, blobs: list[bytes]) -> GpuDecoded:
        """Blocking (call it off the event loop): decode what nvJPEG may, leave the rest to Pillow.

        Raises `InvalidImage("image {i}: ...")` for an image over the limits or with a bad header."""
        assert self._decode_jpegs is not None, self.reason
        eligible = []
        for i, data in enumerate(blobs):
            try:
                why = gpu_ineligible(data, self.limits, self._min_side)
            except ImageDecodeError as e:
                raise InvalidImage(f"image {i}: {e}") from None
            if why is None:
                eligible.append(i)
            else:
                log.debug("image %d takes the Pillow path: %s", i, why)
        pillow = sorted(set(range(len(blobs))) - set(eligible))
        if not eligible:
            return GpuDecoded(None, pillow)
        s = self.cfg.img_size
        with self._on_stream():
            decoded = self._decode_batch([blobs[i] for i in eligible])
            out = torch.empty((len(blobs), 3, s, s), dtype=torch.uint8, device=self.device)
            for i, img in zip(eligible, decoded, strict=True):
                if img is None or img.dim() != 3 or img.shape[0] != 3 or img.dtype != torch.uint8:
                    pillow.append(i)  # refused by nvJPEG (logged), or not the RGB we asked for
                    continue
                try:
                    out[i] = eval_transform_tensor(img, self.cfg)  # (3, S, S)
                except (ValueError, torch.OutOfMemoryError) as e:
                    # Decoded to another size than its header's (past the aspect limit), or no device
                    # memory for this one: Pillow decodes it on the host.
                    log.debug("image %d takes the Pillow path: %s", i, e)
                    pillow.append(i)
            if self._stream is not None:
                out.record_stream(torch.cuda.default_stream(self.device))
        return GpuDecoded(out, sorted(pillow))

    def fill(self, images: torch.Tensor, rows: list[int], host: torch.Tensor) -> torch.Tensor:
        """Blocking: write the Pillow path's (len(rows), 3, S, S) host tensor into `images` rows."""
        with self._on_stream():
            images[torch.tensor(rows, device=self.device)] = host.to(self.device)
        return images

    def _decode_batch(self, blobs: list[bytes]) -> list[torch.Tensor | None]:
        """One batched call; if it fails (one bad image fails them all), one call per image to find
        the images nvJPEG refuses (None)."""
        assert self._decode_jpegs is not None
        encoded = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        try:
            out = list(self._decode_jpegs(encoded, self.device))
            if len(out) != len(encoded):
                raise RuntimeError(f"{len(out)} images decoded from {len(encoded)}")
            return out  # type: ignore[return-value]
        except torch.AcceleratorError:
            raise  # a sticky device error: every later call fails too, retrying hides it
        except Exception as e:
            if self._stream is not None:
                self._stream.synchronize()  # the failed call's blocks are free only once it is done
            if len(encoded) == 1:
                log.debug("nvJPEG refused an image: %s", e)
                return [None]
        each: list[torch.Tensor | None] = []
        for one in encoded:
            try:
                each.append(self._decode_jpegs([one], self.device)[0])
            except torch.AcceleratorError:
                raise
            except Exception as e:
                log.debug("nvJPEG refused an image: %s", e)
                each.append(None)
        return each
