"""Generators for the bad-input corpus (issue D, point 6): images, bodies, artifacts and ids.

Everything is built in memory, deterministically, from a seed: no fixture files to drift. Hostile
images are written byte by byte where Pillow would refuse to write them (a PNG whose IHDR claims
30000x30000 pixels, a decompression bomb whose IDAT inflates to 50 MB of zeros), so each case is
exactly the attack it names and nothing else.

`Case` is one HTTP request with the answer it must get; `test_bad_input.py` sends them all.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import math
import pickle
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from prompt_store.artifact import FORMAT, save_artifact
from prompt_store.artifact_header import encode
from tests.server.helpers import make_artifact
from vpt.hub import Backbone

# ------------------------------------------------------------------------------------------ requests


@dataclass(frozen=True)
class Case:
    """One request of the corpus and the answer it must get."""

    id: str  # pytest id, also printed
    method: str  # HTTP method
    path: str  # path with query; "{task}" is replaced by the test's task id
    status: int  # expected status
    type: str | None = None  # expected error type (None: a success)
    words: tuple[str, ...] = ()  # each must appear in the error message (the problem is named)
    content: bytes | None = None  # raw body
    headers: dict[str, str] = field(default_factory=dict)
    files: list[tuple[str, tuple[str, bytes]]] | None = None  # multipart files
    json: Any = None  # JSON body
    chunked: bool = False  # send `content` with chunked transfer encoding (no Content-Length)

    def send(self, client: Any, task: str) -> Any:
        kw: dict[str, Any] = {"headers": self.headers}
        if self.content is not None:
            data = self.content
            kw["content"] = (
                (data[i : i + 65536] for i in range(0, len(data), 65536)) if self.chunked else data
            )
        if self.files is not None:
            kw["files"] = self.files
        if self.json is not None:
            kw["json"] = self.json
        return client.request(self.method, self.path.replace("{task}", task), **kw)


def photo_like(w: int, h: int, seed: int = 0, noise: float = 4.0) -> np.ndarray:
    """A photo-like (h, w, 3) uint8 image: low-frequency waves plus a little noise (what JPEG is for)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    waves = [
        127.5 + 100 * np.sin(xx / rng.uniform(3, 30) + c) * np.cos(yy / rng.uniform(3, 30) + 2 * c)
        for c in range(3)
    ]
    arr = np.stack(waves, -1) + rng.normal(0, noise, (h, w, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)


def raw_image(data: bytes, mime: str = "image/png") -> dict[str, Any]:
    return {"content": data, "headers": {"content-type": mime}}


def text_form(fields: dict[str, str], boundary: str = "corpus-boundary") -> dict[str, Any]:
    """A multipart/form-data body of text fields only (httpx would send those urlencoded)."""
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
        for k, v in fields.items()
    ]
    body = ("".join(parts) + f"--{boundary}--\r\n").encode()
    return {"content": body, "headers": {"content-type": f"multipart/form-data; boundary={boundary}"}}


# ---------------------------------------------------------------------------------------------- images


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def encoded(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def png_raw(w: int, h: int, bit_depth: int, color_type: int, idat: bytes, extra: bytes = b"") -> bytes:
    """A PNG from its parts: whatever the IHDR claims, whatever the IDAT holds."""
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + extra
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


@functools.lru_cache(maxsize=8)
def png_bomb(side: int) -> bytes:
    """A 1-bit side x side PNG of zeros: a few KB on disk, side² pixels once decoded."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    return png_raw(side, side, 1, 0, idat)


def png_claiming(w: int, h: int) -> bytes:
    """A PNG header claiming w x h RGB pixels, followed by almost no data."""
    return png_raw(w, h, 8, 2, zlib.compress(b"\x00" * 16))


def jpeg_claiming(w: int, h: int) -> bytes:
    """A small valid JPEG whose SOF0 frame header is patched to claim w x h pixels."""
    data = bytearray(encoded(Image.new("RGB", (40, 30), (10, 20, 30)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def png_text_bomb() -> bytes:
    """A 4x4 PNG with a zTXt chunk that inflates to 50 MB (Pillow caps text chunks)."""
    pixels = zlib.compress(b"".join(b"\x00" + b"\x00" * 12 for _ in range(4)))
    ztxt = b"k\x00\x00" + zlib.compress(b"a" * 50_000_000, 9)
    return png_raw(4, 4, 8, 2, pixels, extra=png_chunk(b"zTXt", ztxt))


def png(seed: int = 0, size: tuple[int, int] = (40, 36)) -> bytes:
    return encoded(noise(*size, seed=seed), "PNG")


def jpeg(seed: int = 0, size: tuple[int, int] = (64, 48), **kw: Any) -> bytes:
    return encoded(noise(*size, seed=seed), "JPEG", **kw)


def cmyk_jpeg() -> bytes:
    return encoded(noise(40, 30, 1).convert("CMYK"), "JPEG")


def png16() -> bytes:
    rng = np.random.default_rng(2)
    return encoded(Image.fromarray(rng.integers(0, 65536, (30, 40)).astype(np.uint16)), "PNG")


def palette_alpha_png() -> bytes:
    img = noise(40, 30, 3).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encoded(img, "PNG", transparency=3)


def rgba_png() -> bytes:
    img = noise(40, 30, 4).convert("RGBA")
    img.putalpha(128)
    return encoded(img, "PNG")


def animated_gif() -> bytes:
    frames = [noise(40, 30, 10 + i).convert("P") for i in range(3)]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0)


def grayscale_png() -> bytes:
    return encoded(noise(40, 30, 5).convert("L"), "PNG")


def grayscale_jpeg() -> bytes:
    return encoded(noise(40, 30, 6).convert("L"), "JPEG")


def bilevel_png() -> bytes:
    return encoded(noise(40, 30, 7).convert("1"), "PNG")


def webp() -> bytes:
    return encoded(noise(40, 30, 8), "WEBP")


def bmp() -> bytes:
    return encoded(noise(40, 30, 9), "BMP")


def exif_pair() -> tuple[bytes, bytes, bytes]:
    """(upright reference, stored-rotated with EXIF orientation 6, same pixels without the tag).

    A 48x32 (landscape) picture is stored rotated 90° counter-clockwise as 32x48 pixels with
    Orientation = 6 ("rotate 90° clockwise to display"). Quality 100 without chroma subsampling on
    16-pixel-aligned sides makes the JPEG round trip nearly exact in either orientation.
    """
    upright = noise(48, 32, 11)
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    q = {"quality": 100, "subsampling": 0}
    return (
        encoded(upright, "JPEG", **q),
        encoded(stored, "JPEG", exif=exif.tobytes(), **q),
        encoded(stored, "JPEG", **q),
    )


def garbage_exif_jpeg() -> bytes:
    """A valid JPEG whose APP1 EXIF block is garbage: the pixels are still good."""
    return jpeg(12, (40, 30), exif=b"Exif\x00\x00" + b"\xff" * 40)


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    return data[: int(len(data) * keep)]


def random_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


# ------------------------------------------------------------------------------------------- artifacts


def safetensors_raw(header: dict[str, Any] | bytes, body: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def good_metadata(bb: Backbone, **changes: str | None) -> dict[str, str]:
    meta = {
        "format": FORMAT,
        "mode": "shallow",
        "backbone": bb.backbone_id,
        "backbone_fingerprint": bb.fingerprint,
        "labels": json.dumps(["a", "b"]),
    }
    for k, v in changes.items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v
    return meta


_CODES = {torch.float32: "F32", torch.float16: "F16", torch.float64: "F64", torch.int32: "I32"}


def tensors_raw(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> bytes:
    """A safetensors file with exactly these tensors and metadata: no format rule applied."""
    records = [
        (n, _CODES[t.dtype], tuple(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes())
        for n, t in tensors.items()
    ]
    return encode(records, meta)


def good_tensors(bb: Backbone, layers: int = 1, plen: int = 2, classes: int = 2) -> dict[str, torch.Tensor]:
    D = bb.cfg.embed_dim
    return {
        "prompts": torch.zeros(layers, plen, D),
        "head.weight": torch.zeros(classes, D),
        "head.bias": torch.zeros(classes),
    }


class _Touch:
    """A pickle payload that creates a file when unpickled (proof that nothing unpickles)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "w"))


def pickles(marker: str) -> dict[str, bytes]:
    """Pickle-based files an attacker might upload as a 'task': each would touch `marker` if loaded."""
    zipped, legacy = io.BytesIO(), io.BytesIO()
    torch.save({"prompts": _Touch(marker)}, zipped)
    torch.save({"prompts": _Touch(marker)}, legacy, _use_new_zipfile_serialization=False)
    raw = pickle.dumps(_Touch(marker))
    return {
        "torch-save-zip": zipped.getvalue(),
        "torch-save-legacy": legacy.getvalue(),
        "raw-pickle": raw,
        "pickle-behind-length": struct.pack("<Q", len(raw)) + raw,  # reaches the JSON stage
    }


def backbone_artifact_cases(bb: Backbone, max_prompt_length: int, max_classes: int) -> list[Case]:
    """Artifacts that are well-formed files but wrong for this server (422 naming the field)."""
    D, depth = bb.cfg.embed_dim, bb.cfg.depth
    meta = functools.partial(good_metadata, bb)
    foreign = make_artifact(bb, P=2, mode="shallow", C=2, seed=0)
    foreign.backbone_fingerprint = "f" * 64
    other_width = {
        "prompts": torch.zeros(1, 2, D * 2),
        "head.weight": torch.zeros(2, D * 2),
        "head.bias": torch.zeros(2),
    }
    specs: list[tuple[str, bytes, str, tuple[str, ...]]] = [
        ("foreign-fingerprint", save_artifact(foreign), "backbone_fingerprint", ("fingerprint",)),
        ("other-embed-width", tensors_raw(other_width, meta()), "prompts", ("embed_dim",)),
        (
            "deep-wrong-depth",
            tensors_raw(good_tensors(bb, layers=depth + 1), meta(mode="deep")),
            "prompts",
            ("depth",),
        ),
        (
            "too-many-prompt-tokens",
            tensors_raw(good_tensors(bb, plen=max_prompt_length + 1), meta()),
            "prompts",
            (f"P={max_prompt_length + 1}",),
        ),
        (
            "too-many-classes",
            tensors_raw(
                good_tensors(bb, classes=max_classes + 1),
                meta(labels=json.dumps([str(i) for i in range(max_classes + 1)])),
            ),
            "head.weight",
            (f"C={max_classes + 1}",),
        ),
        (
            "labels-mismatch",
            tensors_raw(good_tensors(bb), meta(labels=json.dumps(["only-one"]))),
            "labels",
            ("1 entries", "C=2"),
        ),
        (
            "nan-prompts",
            tensors_raw(
                {**good_tensors(bb), "prompts": torch.full((1, 2, D), math.nan)},
                meta(),
            ),
            "prompts",
            ("NaN",),
        ),
        (
            "inf-bias",
            tensors_raw({**good_tensors(bb), "head.bias": torch.tensor([0.0, math.inf])}, meta()),
            "head.bias",
            ("non-finite",),
        ),
        (
            "dtype-f64",
            tensors_raw({k: v.double() for k, v in good_tensors(bb).items()}, meta()),
            "prompts",
            ("F64",),
        ),
        (
            "dtype-int32",
            tensors_raw({k: v.int() for k, v in good_tensors(bb).items()}, meta()),
            "prompts",
            ("I32",),
        ),
        (
            "dtype-mixed",
            tensors_raw({**good_tensors(bb), "head.weight": torch.zeros(2, D, dtype=torch.float16)}, meta()),
            "head.weight",
            ("differs",),
        ),
        (
            "prompts-2d",
            tensors_raw({**good_tensors(bb), "prompts": torch.zeros(2, D)}, meta()),
            "prompts",
            (),
        ),
        (
            "head-width",
            tensors_raw({**good_tensors(bb), "head.weight": torch.zeros(2, D + 1)}, meta()),
            "head.weight",
            ("width",),
        ),
        (
            "bias-shape",
            tensors_raw({**good_tensors(bb), "head.bias": torch.zeros(3)}, meta()),
            "head.bias",
            ("shape",),
        ),
        ("shallow-two-layers", tensors_raw(good_tensors(bb, layers=2), meta()), "mode", ("shallow",)),
        ("format-missing", tensors_raw(good_tensors(bb), meta(format=None)), "format", ()),
        ("format-v2", tensors_raw(good_tensors(bb), meta(format="vpt-task/2")), "format", ("version 2",)),
        ("unknown-tensor", tensors_raw({**good_tensors(bb), "evil": torch.zeros(1)}, meta()), "evil", ()),
        ("header-length-2**60", struct.pack("<Q", 2**60) + b"{}", "header", ("header length",)),
        ("header-past-end", struct.pack("<Q", 10_000) + b'{"a": 1}', "header", ("truncated",)),
        ("header-not-json", safetensors_raw(b"{not json at all}"), "header", ("JSON",)),
        ("header-nested-deep", safetensors_raw(b'{"a":' + b"[" * 100_000), "header", ("deep",)),
        (
            "header-duplicate-key",
            safetensors_raw(b'{"prompts": {}, "prompts": {}}'),
            "header",
            ("duplicate",),
        ),
        ("random-bytes", random_bytes(4096, seed=3), "header", ("not a safetensors file",)),
    ]
    return [
        Case(
            id=f"artifact-{name}",
            method="PUT",
            path="/v1/tasks/{task}",
            status=422,
            type="invalid_artifact",
            words=(f"{field_name}:", *words),
            content=data,
            headers={"content-type": "application/octet-stream"},
        )
        for name, data, field_name, words in specs
    ]


# ------------------------------------------------------------------------------------------- the cases

CLASSIFY = "/v1/tasks/{task}/classify"


def _bad_image(name: str, data: bytes, *words: str, mime: str = "image/png") -> Case:
    return Case(
        id=f"image-{name}",
        method="POST",
        path=CLASSIFY,
        status=400,
        type="invalid_image",
        words=("image 0", *words),
        **raw_image(data, mime),
    )


def _good_image(name: str, data: bytes, mime: str = "image/png") -> Case:
    return Case(id=f"image-ok-{name}", method="POST", path=CLASSIFY, status=200, **raw_image(data, mime))


def image_cases(max_image_bytes: int) -> list[Case]:
    """Hostile and unusual images. Decodable ones must classify (200); the rest 400 naming the image."""
    whole_png, whole_jpeg = png(1, (64, 64)), jpeg(1, (64, 64))
    ok = png(0)
    return [
        _bad_image("empty", b"", "empty"),
        _bad_image("truncated-png", truncated(whole_png), "truncated"),
        _bad_image("truncated-jpeg", truncated(whole_jpeg), "truncated", mime="image/jpeg"),
        _bad_image("truncated-jpeg-header", whole_jpeg[:200], mime="image/jpeg"),
        _bad_image("png-signature-only", whole_png[:8]),
        _bad_image("random-bytes", random_bytes(5000, seed=1), "unrecognised"),
        _bad_image(
            "svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "unrecognised"
        ),
        _bad_image("zero-width-png", png_raw(0, 10, 8, 2, zlib.compress(b""))),
        # Decompression bombs: tiny on disk, 49 M / 100 M / 400 M pixels decoded. The first is over our
        # limit (40 M), the others also trip Pillow's own guard; each is refused before decoding.
        _bad_image("bomb-png-7000", png_bomb(7000), "7000x7000", "limit"),
        _bad_image("bomb-png-10000", png_bomb(10000), "pixels"),
        _bad_image("bomb-png-20000", png_bomb(20000), "pixels"),
        _bad_image("header-png-30000x30000", png_claiming(30000, 30000), "pixels"),
        _bad_image("header-jpeg-30000x30000", jpeg_claiming(30000, 30000), "pixels", mime="image/jpeg"),
        _bad_image("text-chunk-bomb-png", png_text_bomb(), "too large"),
        _bad_image("over-byte-limit", b"\x89PNG" + b"\0" * max_image_bytes, "bytes", "limit"),
        Case(
            id="image-bad-among-good",
            method="POST",
            path=CLASSIFY,
            status=400,
            type="invalid_image",
            words=("image 2",),
            files=[("images", (f"{i}.png", ok)) for i in range(2)] + [("images", ("2.png", b"nope"))],
        ),
        Case(
            id="image-empty-multipart-file",
            method="POST",
            path=CLASSIFY,
            status=400,
            type="invalid_image",
            words=("image 0", "empty"),
            files=[("images", ("0.png", b""))],
        ),
        _good_image("cmyk-jpeg", cmyk_jpeg(), "image/jpeg"),
        _good_image("png-16bit", png16()),
        _good_image("palette-alpha-png", palette_alpha_png()),
        _good_image("rgba-png", rgba_png()),
        _good_image("animated-gif", animated_gif(), "image/gif"),
        _good_image("grayscale-png", grayscale_png()),
        _good_image("grayscale-jpeg", grayscale_jpeg(), "image/jpeg"),
        _good_image("bilevel-png", bilevel_png()),
        _good_image("webp", webp(), "image/webp"),
        _good_image("bmp", bmp(), "image/bmp"),
        _good_image("exif-rotated-jpeg", exif_pair()[1], "image/jpeg"),
        _good_image("garbage-exif-jpeg", garbage_exif_jpeg(), "image/jpeg"),
        _good_image("one-pixel", png(3, (1, 1))),
        # Aspect 1:2,000,000 — 8 KB, 2 Mpixels; naive resize-then-crop would allocate 7.8 GB.
        _good_image("extreme-aspect-1x2000000", tall_png(2_000_000)),
        _good_image("octet-stream", ok, "application/octet-stream"),
        _good_image("mislabelled-jpeg-as-png", whole_jpeg, "image/png"),
    ]


def tall_png(h: int) -> bytes:
    """A 1 x h grey PNG: a few KB whatever h."""
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(b"\x00\x80\x80\x80") for _ in range(h)) + z.flush()
    return png_raw(1, h, 8, 2, idat)


def body_cases(max_body_bytes: int, max_images: int, max_top_k: int) -> list[Case]:
    """Malformed, oversized and mistyped classify bodies: 400/413/415/422 naming the problem."""
    img = png(0)
    b64 = base64.b64encode(img).decode()
    boundary = "xyzzy"
    mp = f"multipart/form-data; boundary={boundary}"

    def bad(name: str, status: int, type_: str, *words: str, path: str = CLASSIFY, **kw: Any) -> Case:
        return Case(id=f"body-{name}", method="POST", path=path, status=status, type=type_, words=words, **kw)

    return [
        bad("oversized", 413, "payload_too_large", "limit", **raw_image(b"\0" * (max_body_bytes + 1))),
        bad(
            "oversized-chunked",  # no Content-Length: the limit holds while streaming
            413,
            "payload_too_large",
            "limit",
            content=b"\0" * (max_body_bytes + 65536),
            chunked=True,
            headers={"content-type": "image/png"},
        ),
        bad(
            "wrong-content-type",
            415,
            "unsupported_media_type",
            "text/plain",
            content=img,
            headers={"content-type": "text/plain"},
        ),
        bad("no-content-type", 415, "unsupported_media_type", "Content-Type", content=img),
        bad(
            "form-urlencoded",
            415,
            "unsupported_media_type",
            "x-www-form-urlencoded",
            content=b"images=abc",
            headers={"content-type": "application/x-www-form-urlencoded"},
        ),
        bad(
            "multipart-no-boundary",
            400,
            "invalid_request",
            "multipart",
            content=b"--x\r\n",
            headers={"content-type": "multipart/form-data"},
        ),
        bad(
            "multipart-garbage",
            400,
            "invalid_request",
            "multipart",
            content=b"this is not multipart",
            headers={"content-type": mp},
        ),
        bad(
            "multipart-truncated",
            400,
            "invalid_request",
            "multipart",
            content=(
                f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n'
                "Content-Type: image/png\r\n\r\n"
            ).encode()
            + img[:100],
            headers={"content-type": mp},
        ),
        bad(
            "multipart-bad-header",
            400,
            "invalid_request",
            "multipart",
            content=f"--{boundary}\r\nno colon here\r\n\r\nx\r\n--{boundary}--\r\n".encode(),
            headers={"content-type": mp},
        ),
        bad("multipart-no-images-field", 400, "invalid_request", "images", files=[("other", ("a.png", img))]),
        bad(
            "multipart-images-as-text", 400, "invalid_request", "file", **text_form({"images": "not a file"})
        ),
        bad("multipart-zero-files", 400, "invalid_request", "images", **text_form({"top_k": "3"})),
        bad(
            "json-malformed",
            400,
            "invalid_request",
            "JSON",
            content=b'{"images": [',
            headers={"content-type": "application/json"},
        ),
        bad(
            "json-not-utf8",
            400,
            "invalid_request",
            "JSON",
            content=b'{"images": ["\xff\xfe"]}',
            headers={"content-type": "application/json"},
        ),
        bad("json-not-object", 400, "invalid_request", "images", json=[b64]),
        bad("json-images-not-list", 400, "invalid_request", "images", json={"images": b64}),
        bad("json-image-not-string", 400, "invalid_request", "images[0]", json={"images": [123]}),
        bad("json-bad-base64", 400, "invalid_request", "images[1]", "base64", json={"images": [b64, "***"]}),
        bad("json-base64-truncated", 400, "invalid_request", "base64", json={"images": [b64[:-3]]}),
        bad("json-top-k-negative", 400, "invalid_request", "top_k", json={"images": [b64], "top_k": -1}),
        bad("json-top-k-bool", 400, "invalid_request", "top_k", json={"images": [b64], "top_k": True}),
        bad("json-top-k-string", 400, "invalid_request", "top_k", json={"images": [b64], "top_k": "5"}),
        bad("json-zero-images", 400, "invalid_request", "no images", json={"images": []}),
        bad(
            "json-deeply-nested",
            400,
            "invalid_request",
            "JSON",
            content=b'{"images": ' + b"[" * 100_000,
            headers={"content-type": "application/json"},
        ),
        bad(
            "json-huge-integer",  # int() of 5000 digits raises ValueError (not JSONDecodeError) on 3.11+
            400,
            "invalid_request",
            "JSON",
            content=b'{"images": [], "top_k": ' + b"7" * 5000 + b"}",
            headers={"content-type": "application/json"},
        ),
        bad(
            "too-many-images-multipart",
            400,
            "invalid_request",
            f"{max_images + 1} images",
            "limit",
            files=[("images", (f"{i}.png", img)) for i in range(max_images + 1)],
        ),
        bad(
            "too-many-images-json",
            400,
            "invalid_request",
            f"{max_images + 1} images",
            "limit",
            json={"images": [b64] * (max_images + 1)},
        ),
        bad(
            "top-k-query-zero", 422, "invalid_request", "top_k", path=CLASSIFY + "?top_k=0", **raw_image(img)
        ),
        bad(
            "top-k-query-text",
            422,
            "invalid_request",
            "top_k",
            path=CLASSIFY + "?top_k=many",
            **raw_image(img),
        ),
        bad(
            "top-k-over-limit",
            400,
            "invalid_request",
            "top_k",
            str(max_top_k),
            path=CLASSIFY + f"?top_k={max_top_k + 1}",
            **raw_image(img),
        ),
        Case(
            id="body-ok-json-data-url",
            method="POST",
            path=CLASSIFY,
            status=200,
            json={"images": ["data:image/png;base64," + b64], "top_k": 1},
        ),
        Case(
            id="body-ok-multipart-max-images",
            method="POST",
            path=CLASSIFY,
            status=200,
            files=[("images", (f"{i}.png", img)) for i in range(max_images)],
        ),
    ]


def upload_body_cases(bb: Backbone, max_artifact_bytes: int, marker: str) -> list[Case]:
    """Upload bodies: pickles (never unpickled), empty, oversized, mistyped, malformed multipart."""
    octet = {"content-type": "application/octet-stream"}
    good_artifact = save_artifact(make_artifact(bb, P=3, mode="deep", C=4, seed=5))
    good_f16 = save_artifact(make_artifact(bb, P=3, mode="deep", C=4, seed=6), torch.float16)
    good_bf16 = save_artifact(make_artifact(bb, P=0, mode="shallow", C=3, seed=7), torch.bfloat16)
    cases = [
        Case(
            id=f"upload-pickle-{name}",
            method="PUT",
            path="/v1/tasks/{task}",
            status=422,
            type="invalid_artifact",
            words=("header",),
            content=data,
            headers=octet,
        )
        for name, data in pickles(marker).items()
    ]

    def bad(name: str, status: int, type_: str, *words: str, **kw: Any) -> Case:
        return Case(
            id=f"upload-{name}",
            method="PUT",
            path="/v1/tasks/{task}",
            status=status,
            type=type_,
            words=words,
            **kw,
        )

    return [
        *cases,
        bad("empty", 400, "invalid_request", "empty", content=b"", headers=octet),
        bad(
            "oversized",
            413,
            "payload_too_large",
            "limit",
            content=b"\0" * (max_artifact_bytes + 1),
            headers=octet,
        ),
        bad(
            "oversized-chunked",
            413,
            "payload_too_large",
            "limit",
            content=b"\0" * (max_artifact_bytes + 65536),
            chunked=True,
            headers=octet,
        ),
        bad(
            "oversized-multipart",
            413,
            "payload_too_large",
            "limit",
            files=[("artifact", ("a.safetensors", b"\0" * (max_artifact_bytes + 1)))],
        ),
        bad(
            "wrong-content-type",
            415,
            "unsupported_media_type",
            "image/png",
            content=good_artifact,
            headers={"content-type": "image/png"},
        ),
        bad("json-body", 415, "unsupported_media_type", "application/json", json={"prompts": [1, 2]}),
        bad(
            "multipart-two-files",
            400,
            "invalid_request",
            "exactly one",
            files=[("artifact", ("a", good_artifact)), ("file", ("b", good_artifact))],
        ),
        bad(
            "multipart-text-field", 400, "invalid_request", "must be a file", **text_form({"artifact": "abc"})
        ),
        bad(
            "multipart-garbage",
            400,
            "invalid_request",
            "multipart",
            content=b"garbage",
            headers={"content-type": "multipart/form-data; boundary=zz"},
        ),
        Case(
            id="upload-ok-multipart",
            method="PUT",
            path="/v1/tasks/{task}",
            status=201,
            files=[("artifact", ("a.safetensors", good_artifact))],
        ),
        Case(
            id="upload-ok-f16",
            method="PUT",
            path="/v1/tasks/{task}",
            status=201,
            content=good_f16,
            headers=octet,
        ),
        Case(
            id="upload-ok-bf16-linear-probe",
            method="PUT",
            path="/v1/tasks/{task}",
            status=201,
            content=good_bf16,
            headers=octet,
        ),
    ]


def id_cases() -> list[Case]:
    """Task ids and tenant/cursor parameters that try to leave the caller's namespace, or are just wrong.

    A `/` (even percent-encoded: `..%2F`) is decoded before routing, so such paths match no route
    (404 naming the path); every other bad id reaches the id rule (400 invalid_task_id).
    """
    routes = [
        ("GET", "/v1/tasks/{id}"),
        ("PUT", "/v1/tasks/{id}"),
        ("POST", "/v1/tasks/{id}/classify"),
        ("DELETE", "/v1/tasks/{id}"),
        ("POST", "/v1/tasks/{id}/rollback"),
    ]
    bad_ids = {
        "dotdot-encoded": "%2e%2e",
        "dotdot-upper-encoded": "%2E%2E",
        "backslash-traversal": "..%5c..%5cetc",
        "double-encoded-dotdot": "%252e%252e",
        "unicode": "caf%C3%A9",
        "cyrillic": "%D0%B7%D0%B0%D0%B4%D0%B0%D1%87%D0%B0",
        "fullwidth": "%EF%BD%81",
        "uppercase": "Birds",
        "leading-dot": ".hidden",
        "leading-dash": "-x",
        "nul": "a%00b",
        "newline": "x%0A",
        "space": "a%20b",
        "overlong-65": "a" * 65,
        "overlong-5000": "a" * 5000,
    }
    cases = []
    for name, raw_id in bad_ids.items():
        for method, route in routes:
            body: dict[str, Any] = {}
            if method == "PUT":
                body = {"content": b"x", "headers": {"content-type": "application/octet-stream"}}
            elif route.endswith("classify"):
                body = raw_image(png(0))
            elif route.endswith("rollback"):
                body = {"json": {"version": 1}}
            cases.append(
                Case(
                    id=f"id-{name}-{method}-{route.rsplit('/', 1)[-1].strip('{}')}",
                    method=method,
                    path=route.replace("{id}", raw_id),
                    status=400,
                    type="invalid_task_id",
                    words=("task_id",),
                    **body,
                )
            )
    for name, path in {
        "slash-encoded-traversal": "/v1/tasks/..%2Fx",
        "slash-encoded-traversal-classify": "/v1/tasks/..%2F..%2Fother%2Ft/classify",
        "encoded-dotdot-slash": "/v1/tasks/%2e%2e%2f%2e%2e%2fetc",
    }.items():
        cases.append(
            Case(
                id=f"id-{name}",
                method="GET" if "classify" not in path else "POST",
                path=path,
                status=404,
                type="not_found",
                words=("no route",),
            )
        )
    for name, query, status, type_, word in [
        ("tenant-traversal", "tenant=..%2Fother", 400, "invalid_request", "tenant"),
        ("tenant-unicode", "tenant=caf%C3%A9", 400, "invalid_request", "tenant"),
        ("tenant-overlong", "tenant=" + "a" * 65, 422, "invalid_request", "tenant"),
        ("cursor-traversal", "cursor=..%2F..%2Fx", 400, "invalid_request", "cursor"),
        ("cursor-overlong", "cursor=" + "a" * 300, 422, "invalid_request", "cursor"),
        ("limit-zero", "limit=0", 422, "invalid_request", "limit"),
        ("limit-huge", "limit=100000", 422, "invalid_request", "limit"),
        ("limit-text", "limit=ten", 422, "invalid_request", "limit"),
    ]:
        cases.append(
            Case(
                id=f"query-{name}",
                method="GET",
                path=f"/v1/tasks?{query}",
                status=status,
                type=type_,
                words=(word,),
            )
        )
    for name, body, word in [
        ("rollback-version-zero", {"json": {"version": 0}}, "version"),
        ("rollback-version-text", {"json": {"version": "one"}}, "version"),
        ("rollback-no-body", {}, "required"),
        ("rollback-bad-json", {"content": b"{", "headers": {"content-type": "application/json"}}, "JSON"),
    ]:
        cases.append(
            Case(
                id=f"body-{name}",
                method="POST",
                path="/v1/tasks/{task}/rollback",
                status=422,
                type="invalid_request",
                words=(word,),
                **body,
            )
        )
    return cases
