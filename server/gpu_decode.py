"""Optional GPU JPEG decoding (issue H, point 4): nvJPEG through `torchvision.io.decode_jpeg`.

Off by default (`VPT_GPU_DECODE`): nvJPEG's IDCT and chroma upsampling, and the float resize of
`vpt.transforms.eval_transform_tensor`, differ from Pillow's (the trainer's transform) by a few uint8
levels. When on, the JPEGs of a request that nvJPEG decodes exactly as Pillow would (same pixels up to
that rounding, same orientation, same geometry) are decoded in one batched call on the engine's device
and transformed there; everything else takes the Pillow path (`server.preprocess`).

Who does what: the process that parsed the request (an API server, or the one server process) picks
the rows from the headers (`nvjpeg_rows`, no CUDA needed) and decodes the others with Pillow; the engine
core, which owns the device, decodes the picked JPEGs' bytes (`GpuDecoder.complete`), so API servers
never create a CUDA context. A JPEG takes the Pillow path when it is:
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
- over what one request may hand the core (`nvjpeg_rows`' budget: the API server's arena);
- refused by nvJPEG: Pillow decodes it in the core, or reports the precise error.
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
from collections.abc import Callable, Iterator, Sequence

import torch
from PIL import ExifTags, Image

from server.errors import InvalidImage
from vpt.config import ViTConfig
from vpt.transforms import (
    MAX_EXACT_ASPECT,
    ImageDecodeError,
    ImageLimits,
    decode_image,
    eval_sizes,
    eval_transform,
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


def nvjpeg_rows(
    blobs: list[bytes], cfg: ViTConfig, limits: ImageLimits, budget: int | None = None
) -> list[int]:
    """The positions of a request's images that nvJPEG may decode (`gpu_ineligible`), ascending.

    `budget`: the JPEG bytes these may add up to at most (the rest are left to Pillow): what an API
    server hands the engine core must fit its shared-memory arena (`server.core.arena`).

    Raises `InvalidImage("image {i}: ...")` for an image over the limits or with a bad header, with the
    Pillow path's messages (so a refused image gets the same 400 whichever path it was headed for)."""
    min_side = MIN_DOWNSCALE * eval_sizes(cfg)[0]  # smaller JPEGs: Pillow's (module docstring)
    rows, left = [], budget
    for i, data in enumerate(blobs):
        try:
            why = gpu_ineligible(data, limits, min_side)
        except ImageDecodeError as e:
            raise InvalidImage(f"image {i}: {e}") from None
        if why is None and left is not None and len(data) > left:
            why = "over the request's budget of JPEG bytes for the engine core"
        if why is not None:
            log.debug("image %d takes the Pillow path: %s", i, why)
            continue
        rows.append(i)
        if left is not None:
            left -= len(data)
    return rows


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

    def complete(self, host: torch.Tensor, jpegs: Sequence[tuple[int, bytes]]) -> torch.Tensor:
        """Blocking (call it off the event loop): a request's images on the device, uint8 (n, 3, S, S),
        from `host` (uint8 (m, 3, S, S), the rows not in `jpegs`, in order) and `jpegs` ((position,
        bytes), ascending, from `nvjpeg_rows`) decoded and transformed here: by nvJPEG, or by Pillow
        where nvJPEG refuses one.

        Raises `InvalidImage("image {i}: ...")` for an image neither can decode."""
        assert self._decode_jpegs is not None, self.reason
        s = self.cfg.img_size
        n = host.shape[0] + len(jpegs)
        gpu = {i for i, _ in jpegs}
        with self._on_stream():
            out = torch.empty((n, 3, s, s), dtype=torch.uint8, device=self.device)
            if host.shape[0]:
                rows = torch.tensor([i for i in range(n) if i not in gpu], device=self.device)
                out[rows] = host.to(self.device)
            decoded = self._decode_batch([data for _, data in jpegs]) if jpegs else []
            for (i, data), img in zip(jpegs, decoded, strict=True):
                if img is not None and img.dim() == 3 and img.shape[0] == 3 and img.dtype == torch.uint8:
                    try:
                        out[i] = eval_transform_tensor(img, self.cfg)  # (3, S, S)
                        continue
                    except (ValueError, torch.OutOfMemoryError) as e:
                        # Decoded to another size than its header's (past the aspect limit), or no device
                        # memory for this one: Pillow decodes it on the host.
                        log.debug("image %d takes the Pillow path: %s", i, e)
                # Refused by nvJPEG (logged), or not the RGB we asked for.
                try:
                    one = eval_transform(decode_image(data, self.limits), self.cfg)
                except ImageDecodeError as e:
                    raise InvalidImage(f"image {i}: {e}") from None
                out[i] = one.to(self.device)
            if self._stream is not None:
                out.record_stream(torch.cuda.default_stream(self.device))
        return out

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
