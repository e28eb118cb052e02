"""Image decoding and the backbone's transforms, shared by the server and the trainer.

One code path for evaluation-time preprocessing means train/serve skew is impossible by construction:
`vpt train` evaluates with `eval_transform`, and the server preprocesses every request with it too.

Recipe (VPT official code `src/data/transforms.py`, following the FGVC setup of the paper, Sec. 4):
- eval:  resize the shorter side to `resize_size` (256 for 224 inputs), centre-crop `img_size`;
- train: resize the shorter side to `resize_size`, random crop `img_size`, random horizontal flip.
Resizing is bilinear with antialiasing (Pillow's `resize`, as torchvision does for PIL images).
Normalisation by the backbone's mean/std happens later, on the device (`VisionTransformer.normalize`),
so the host only moves uint8 tensors. `eval_transform_tensor` is the eval transform on a decoded uint8
tensor on any device (same geometry, torch's resize: within 1 level of Pillow's); only the server's
opt-in GPU JPEG path (`server.gpu_decode`) uses it.
"""

from __future__ import annotations

import contextlib
import io
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from vpt.config import ViTConfig


class ImageDecodeError(ValueError):
    """The bytes are not an image we accept; the message says why (becomes a 4xx in the server)."""


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024  # encoded size of one image
    max_pixels: int = 40_000_000  # width * height, checked from the header before decoding (bombs)


def open_image(data: bytes, limits: ImageLimits | None = None) -> Image.Image:
    """Bytes → a PIL image whose header only has been read, within the byte and pixel limits.

    Cheap (no pixel is decoded): `decode_image` starts with it, and the server's GPU decoder asks it
    whether a JPEG may skip Pillow (`server.gpu_decode`), so both refuse with the same messages.
    """
    limits = limits or ImageLimits()
    if not data:
        raise ImageDecodeError("empty image")
    if len(data) > limits.max_bytes:
        raise ImageDecodeError(f"image is {len(data)} bytes, over the limit of {limits.max_bytes}")
    with _pillow_errors():
        # No warnings.catch_warnings() here: it swaps process-global filters and is not thread-safe
        # (decoding runs in a thread pool). Our own limit below is checked from the header; Pillow's
        # bomb check (`Image.MAX_IMAGE_PIXELS`) only warns between 1x and 2x its limit — the warning
        # is logged, our limit still applies — and raises DecompressionBombError above 2x.
        img = Image.open(io.BytesIO(data))
    w, h = img.size
    if w * h > limits.max_pixels:
        raise ImageDecodeError(f"image is {w}x{h} pixels, over the limit of {limits.max_pixels}")
    return img


def decode_image(data: bytes, limits: ImageLimits | None = None) -> Image.Image:
    """Bytes → RGB PIL image, EXIF orientation applied, first frame of animations.

    The pixel count is checked from the header before any pixel is decoded, so a decompression bomb
    costs nothing. Formats: whatever Pillow reads (JPEG, PNG, WebP, GIF, BMP, ...).
    """
    img = open_image(data, limits)
    with _pillow_errors():
        img.seek(0)  # first frame of GIF/WebP animations
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)


@contextlib.contextmanager
def _pillow_errors() -> Iterator[None]:
    """Pillow's exceptions → ImageDecodeError with a message a client can act on."""
    try:
        yield
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"image rejected as a decompression bomb: {e}") from None
    except UnidentifiedImageError:  # its message would show the repr of our BytesIO, not the cause
        raise ImageDecodeError("unrecognised image format (send JPEG, PNG, WebP, GIF or BMP)") from None
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, ValueError, struct.error...)
        raise ImageDecodeError(f"cannot decode image: {e}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode → RGB. Transparent images are composited on white rather than on undefined colour."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping (PIL's convert("L") clips).
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / peak), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, img).convert("RGB")
    return img.convert("RGB")


# An image of aspect ratio r becomes size x (r * size) pixels when its shorter side is resized, before
# the crop: a 1 x 2,000,000 PNG (8 KB, 2 Mpixels, under any pixel limit) would be resampled to
# 36 x 72,000,000 — 7.8 GB. Up to this ratio the whole image is resized, then cropped (bit-exact
# torchvision semantics); beyond it only the region that lands in the crop is resampled (Pillow's
# `box`), which equals resize-then-crop up to rounding (±1) and costs at most one crop's worth.
MAX_EXACT_ASPECT = 8.0


def _resized_size(w: int, h: int, size: int) -> tuple[int, int]:
    # Same rounding as torchvision's Resize(int): the longer side is int(size * long / short).
    if min(w, h) == size:
        return w, h
    return (size, int(size * h / w)) if w <= h else (int(size * w / h), size)


def _resize_shorter(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    new = _resized_size(w, h, size)
    if new == (w, h):
        return img
    return img.resize(new, Image.Resampling.BILINEAR, reducing_gap=None)


def _resize_then_crop(
    img: Image.Image, size: int, crop: int, corner: Callable[[int, int], tuple[int, int]]
) -> Image.Image:
    """Resize the shorter side to `size`, then take the `crop` square at `corner(resized_w, resized_h)`."""
    w, h = img.size
    nw, nh = _resized_size(w, h, size)
    left, top = corner(nw, nh)
    if max(w, h) <= MAX_EXACT_ASPECT * min(w, h):
        return _resize_shorter(img, size).crop((left, top, left + crop, top + crop))
    sx, sy = w / nw, h / nh  # resized pixel → source pixel
    box = (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)
    return img.resize((crop, crop), Image.Resampling.BILINEAR, box=box, reducing_gap=None)


def _to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()  # (3, H, W)


def eval_sizes(cfg: ViTConfig) -> tuple[int, int]:
    """(shorter side after the resize, crop side) of the eval transform."""
    return max(cfg.resize_size, cfg.img_size), cfg.img_size


def _centre(crop: int) -> Callable[[int, int], tuple[int, int]]:
    """Top-left corner of the centred `crop` square in a w x h image (torchvision's CenterCrop rounding)."""
    return lambda w, h: (round((w - crop) / 2.0), round((h - crop) / 2.0))


def eval_transform(img: Image.Image, cfg: ViTConfig) -> torch.Tensor:
    """RGB image → uint8 (3, img_size, img_size): resize shorter side, centre crop (the server's path)."""
    size, s = eval_sizes(cfg)
    return _to_uint8_tensor(_resize_then_crop(to_rgb(img), size, s, _centre(s)))


def eval_transform_tensor(img: torch.Tensor, cfg: ViTConfig) -> torch.Tensor:
    """uint8 (3, H, W) on any device → uint8 (3, img_size, img_size) on that device.

    `eval_transform`'s geometry exactly (same resized size, same crop offsets), with the resize done by
    `F.interpolate(bilinear, antialias=True)` in float32, then rounded — how torchvision's tensor
    `Resize` approximates Pillow's. Pillow resamples in fixed point, so the two differ by rounding:
    measured on CPU over ~170 sizes from 1x1 to 1536x1024 (aspects up to 8, down- and upscaling, noise
    and smooth images, 224/256 and 32/37 sizes), at most 1 uint8 level; 14 % of values off by one,
    0.10 levels on average, 0.21 for the worst image (tests/vpt/test_transforms_tensor.py asserts it).
    Used by the server's GPU JPEG path (`server.gpu_decode`); the trainer keeps the Pillow path.

    Images longer than `MAX_EXACT_ASPECT` : 1 are refused (ValueError): Pillow resamples only their
    cropped region (`_resize_then_crop`), which this function does not reproduce; callers send them to
    Pillow.
    """
    assert img.dtype == torch.uint8 and img.dim() == 3 and img.shape[0] == 3, (img.dtype, img.shape)
    size, s = eval_sizes(cfg)
    h, w = int(img.shape[1]), int(img.shape[2])
    if max(w, h) > MAX_EXACT_ASPECT * min(w, h):
        raise ValueError(f"aspect ratio of {w}x{h} is over {MAX_EXACT_ASPECT}: use eval_transform")
    nw, nh = _resized_size(w, h, size)
    left, top = _centre(s)(nw, nh)
    if (nw, nh) == (w, h):
        return img[:, top : top + s, left : left + s].contiguous()
    x = F.interpolate(img[None].float(), size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    x = x[0, :, top : top + s, left : left + s]  # (3, S, S) float32
    return x.round_().clamp_(0, 255).to(torch.uint8)


def train_transform(img: Image.Image, cfg: ViTConfig, rng: random.Random) -> torch.Tensor:
    """RGB image → uint8 (3, img_size, img_size): resize shorter side, random crop, random h-flip."""
    s = cfg.img_size

    def random_corner(w: int, h: int) -> tuple[int, int]:
        return rng.randint(0, w - s), rng.randint(0, h - s)

    img = _resize_then_crop(to_rgb(img), max(cfg.resize_size, s), s, random_corner)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _to_uint8_tensor(img)
