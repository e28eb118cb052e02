"""Image decoding and the backbone's transforms, shared by the server and the trainer.

One code path for evaluation-time preprocessing means train/serve skew is impossible by construction:
`vpt train` evaluates with `eval_transform`, and the server preprocesses every request with it too.

Recipe (VPT official code `src/data/transforms.py`, following the FGVC setup of the paper, Sec. 4):
- eval:  resize the shorter side to `resize_size` (256 for 224 inputs), centre-crop `img_size`;
- train: resize the shorter side to `resize_size`, random crop `img_size`, random horizontal flip.
Resizing is bilinear with antialiasing (Pillow's `resize`, as torchvision does for PIL images).
Normalisation by the backbone's mean/std happens later, on the device (`VisionTransformer.normalize`),
so the host only moves uint8 tensors.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from vpt.config import ViTConfig


class ImageDecodeError(ValueError):
    """The bytes are not an image we accept; the message says why (becomes a 4xx in the server)."""


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024  # encoded size of one image
    max_pixels: int = 40_000_000  # width * height, checked from the header before decoding (bombs)


def decode_image(data: bytes, limits: ImageLimits | None = None) -> Image.Image:
    """Bytes → RGB PIL image, EXIF orientation applied, first frame of animations.

    The pixel count is checked from the header before any pixel is decoded, so a decompression bomb
    costs nothing. Formats: whatever Pillow reads (JPEG, PNG, WebP, GIF, BMP, ...).
    """
    limits = limits or ImageLimits()
    if not data:
        raise ImageDecodeError("empty image")
    if len(data) > limits.max_bytes:
        raise ImageDecodeError(f"image is {len(data)} bytes, over the limit of {limits.max_bytes}")
    try:
        # No warnings.catch_warnings() here: it swaps process-global filters and is not thread-safe
        # (decoding runs in a thread pool). Our own limit below is checked from the header; Pillow's
        # bomb check (`Image.MAX_IMAGE_PIXELS`) only warns between 1x and 2x its limit — the warning
        # is logged, our limit still applies — and raises DecompressionBombError above 2x.
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > limits.max_pixels:
            raise ImageDecodeError(f"image is {w}x{h} pixels, over the limit of {limits.max_pixels}")
        img.seek(0)  # first frame of GIF/WebP animations
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)
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


def eval_transform(img: Image.Image, cfg: ViTConfig) -> torch.Tensor:
    """RGB image → uint8 (3, img_size, img_size): resize shorter side, centre crop (the server's path)."""
    s = cfg.img_size

    def centre(w: int, h: int) -> tuple[int, int]:
        return round((w - s) / 2.0), round((h - s) / 2.0)

    return _to_uint8_tensor(_resize_then_crop(to_rgb(img), max(cfg.resize_size, s), s, centre))


def train_transform(img: Image.Image, cfg: ViTConfig, rng: random.Random) -> torch.Tensor:
    """RGB image → uint8 (3, img_size, img_size): resize shorter side, random crop, random h-flip."""
    s = cfg.img_size

    def random_corner(w: int, h: int) -> tuple[int, int]:
        return rng.randint(0, w - s), rng.randint(0, h - s)

    img = _resize_then_crop(to_rgb(img), max(cfg.resize_size, s), s, random_corner)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _to_uint8_tensor(img)
