"""Optional GPU JPEG decoding (server/gpu_decode.py, issue H point 4).

On CPU: which images may go to nvJPEG (a pure header check), the decoder reporting itself unavailable
(no CUDA, no torchvision), and the plumbing with a stand-in batch decoder: the Preprocessor picks the
JPEGs and decodes the rest, the core's decoder completes the request (request order, Pillow fallback,
the byte budget, error messages). tests/server/test_core_client.py runs it across the core's socket.
The `gpu` test decodes real JPEGs with nvJPEG (skipped without CUDA and torchvision;
benchmarks/gpu_check.sh runs it).
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from server.engine.batch import stage_images
from server.errors import InvalidImage
from server.gpu_decode import GpuDecoder, gpu_ineligible
from server.preprocess import Pixels, Preprocessor
from tests.server import corpus
from vpt.config import get_preset
from vpt.transforms import ImageDecodeError, ImageLimits, decode_image, eval_transform, eval_transform_tensor

CFG = get_preset("vit_test_tiny")
LIMITS = ImageLimits(max_bytes=200_000, max_pixels=1_000_000)


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(corpus.photo_like(w, h, seed))


def jpeg(w: int, h: int, seed: int = 0, **kw) -> bytes:
    return corpus.encoded(photo(w, h, seed), "JPEG", **kw)


def exif_jpeg(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg(40, 30, exif=exif.tobytes())


def headers_only_jpeg() -> bytes:
    """A JPEG header (it opens) without its scan: Pillow cannot load it."""
    data = jpeg(64, 48)
    return data[: data.index(b"\xff\xda")] + b"\xff\xd9"


# --------------------------------------------------------------------------------- eligibility


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (jpeg(64, 48), None),
        (jpeg(64, 48, progressive=True), None),
        (corpus.encoded(photo(40, 30).convert("L"), "JPEG"), None),
        (exif_jpeg(1), None),
        (exif_jpeg(6), "orientation 6"),
        (exif_jpeg(3), "orientation 3"),
        (corpus.exif_pair()[1], "orientation 6"),
        (corpus.cmyk_jpeg(), "mode CMYK"),
        (corpus.png(0), "not a JPEG"),
        (corpus.webp(), "not a JPEG"),
        (b"", "not a JPEG"),
        (jpeg(8, 100), "aspect ratio"),
        (jpeg(100, 12), "aspect ratio"),
        (jpeg(96, 12), None),  # exactly 8: the exact geometry still applies
        (corpus.truncated(jpeg(64, 48), 0.7), "end-of-image"),
        (jpeg(64, 48) + b"\x00trailer", "end-of-image"),
    ],
    ids=[
        "baseline",
        "progressive",
        "grayscale",
        "exif-1",
        "exif-6",
        "exif-3",
        "corpus-exif-6",
        "cmyk",
        "png",
        "webp",
        "empty",
        "portrait-over-8",
        "landscape-over-8",
        "aspect-8",
        "truncated",
        "trailing-data",
    ],
)
def test_eligibility(data, why):
    got = gpu_ineligible(data, LIMITS)
    if why is None:
        assert got is None
    else:
        assert got is not None and why in got, got


def test_jpegs_the_resize_shrinks_too_little_take_the_pillow_path():
    assert gpu_ineligible(jpeg(64, 48), LIMITS, min_side=48) is None
    assert "downscaled" in (gpu_ineligible(jpeg(64, 47), LIMITS, min_side=48) or "")
    assert "downscaled" in (gpu_ineligible(jpeg(40, 64), LIMITS, min_side=48) or "")


@pytest.mark.parametrize(
    "data",
    [
        corpus.jpeg_claiming(2000, 2000),
        b"\xff\xd8\xff" + b"\0" * LIMITS.max_bytes,
        b"\xff\xd8\xff\xe0garbage",
    ],
    ids=["pixels-from-header", "bytes", "bad-header"],
)
def test_refused_jpegs_get_the_pillow_paths_message(data):
    with pytest.raises(ImageDecodeError) as e:
        decode_image(data, LIMITS)
    with pytest.raises(ImageDecodeError) as g:
        gpu_ineligible(data, LIMITS)
    assert str(g.value) == str(e.value)


# ------------------------------------------------------------------------------- availability


def test_unavailable_on_cpu_and_without_cuda():
    cpu = GpuDecoder("cpu", CFG, LIMITS)
    assert not cpu.available and "not CUDA" in (cpu.reason or "")
    if not torch.cuda.is_available():
        cuda = GpuDecoder("cuda", CFG, LIMITS)
        assert not cuda.available and "CUDA is not available" in (cuda.reason or "")


def test_unavailable_without_torchvision(monkeypatch):
    """CUDA present (faked), torchvision not importable: unavailable, saying so."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: object())
    monkeypatch.setitem(sys.modules, "torchvision", None)  # `import torchvision...` raises ImportError
    monkeypatch.setitem(sys.modules, "torchvision.io", None)
    dec = GpuDecoder("cuda", CFG, LIMITS)
    assert not dec.available and "torchvision is not importable" in (dec.reason or "")


MIXED = [  # CFG's resize side is 37: JPEGs with a shorter side of 74 or more take the GPU path
    jpeg(100, 80, 1),
    corpus.png(2, (40, 36)),
    corpus.cmyk_jpeg(),
    jpeg(80, 120, 3, progressive=True),
    corpus.exif_pair()[1],
    jpeg(74, 74, 4),
    jpeg(73, 90, 5),
]


def pillow_reference(blobs: list[bytes]) -> torch.Tensor:
    return torch.stack([eval_transform(decode_image(b, LIMITS), CFG) for b in blobs])


def run(pre: Preprocessor, blobs: list[bytes]) -> Pixels:
    try:
        return asyncio.run(pre(blobs))
    finally:
        pre.close()


def test_without_the_core_s_gpu_decoder_pillow_decodes_every_image():
    pixels = run(Preprocessor(CFG, LIMITS, threads=2), MIXED)
    assert pixels.jpegs == () and pixels.n == len(MIXED)
    assert torch.equal(pixels.images, pillow_reference(MIXED))


# -------------------------------------------------- the GPU path's plumbing, with a stand-in decoder


class StandIn:
    """A batched 'nvJPEG' made of Pillow, on the CPU; refuses the images whose bytes are in `refuse`
    (failing the whole batch, as nvJPEG does)."""

    def __init__(self, refuse: tuple[bytes, ...] = ()) -> None:
        self.refuse, self.calls = refuse, []

    def __call__(self, tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        blobs = [t.numpy().tobytes() for t in tensors]
        self.calls.append(len(blobs))
        if any(b in self.refuse for b in blobs):
            raise RuntimeError("nvjpegDecodeBatched failed")
        return [
            torch.from_numpy(np.array(Image.open(io.BytesIO(b)).convert("RGB"))).permute(2, 0, 1)
            for b in blobs
        ]


def gpu_path(
    blobs: list[bytes], refuse: tuple[bytes, ...] = (), budget: int | None = None
) -> tuple[torch.Tensor, StandIn, Pixels]:
    """The request's images as the core runs them: picked and Pillow-decoded by the Preprocessor, the
    picked JPEGs decoded by the core's decoder (a stand-in 'nvJPEG' on the CPU)."""
    stand_in = StandIn(refuse)
    pixels = run(Preprocessor(CFG, LIMITS, threads=2, gpu_jpegs=True, jpeg_budget=budget), blobs)
    assert pixels.n == len(blobs)
    return GpuDecoder("cpu", CFG, LIMITS, stand_in).complete(pixels.images, pixels.jpegs), stand_in, pixels


def expected(blobs: list[bytes], via_tensor: set[int]) -> torch.Tensor:
    rows = []
    for i, b in enumerate(blobs):
        if i in via_tensor:
            rgb = np.array(Image.open(io.BytesIO(b)).convert("RGB"))
            rows.append(eval_transform_tensor(torch.from_numpy(rgb).permute(2, 0, 1).contiguous(), CFG))
        else:
            rows.append(eval_transform(decode_image(b, LIMITS), CFG))
    return torch.stack(rows)


def test_gpu_path_keeps_request_order_and_sends_the_rest_to_pillow():
    out, stand_in, pixels = gpu_path(MIXED)
    assert stand_in.calls == [3]  # one batched call: the baseline, progressive and square JPEGs
    assert [i for i, _ in pixels.jpegs] == [0, 3, 5] and pixels.images.shape[0] == len(MIXED) - 3
    assert torch.equal(out, expected(MIXED, {0, 3, 5}))
    assert (out.int() - pillow_reference(MIXED).int()).abs().max().item() <= 1


def test_gpu_path_all_jpeg_and_no_jpeg():
    jpegs = [jpeg(80 + 7 * i, 75 + 3 * i, i) for i in range(4)]
    out, stand_in, pixels = gpu_path(jpegs)
    assert stand_in.calls == [4] and torch.equal(out, expected(jpegs, {0, 1, 2, 3}))
    assert pixels.images.shape == (0, 3, CFG.img_size, CFG.img_size)
    pngs = [corpus.png(i) for i in range(3)]
    out, stand_in, _ = gpu_path(pngs)
    assert stand_in.calls == [] and torch.equal(out, pillow_reference(pngs))


def test_a_refused_image_is_retried_alone_then_decoded_by_pillow():
    blobs = [jpeg(100, 80, 1), jpeg(80, 90, 2), jpeg(96, 96, 3)]
    out, stand_in, _ = gpu_path(blobs, refuse=(blobs[1],))
    assert stand_in.calls == [3, 1, 1, 1]  # the batch fails, then one call per image finds it
    assert torch.equal(out, expected(blobs, {0, 2}))


def test_jpegs_over_the_budget_are_decoded_by_pillow():
    blobs = [jpeg(100, 80, 1), jpeg(80, 90, 2), jpeg(96, 96, 3)]
    budget = len(blobs[0]) + len(blobs[1]) + len(blobs[2]) - 1  # the third one no longer fits
    out, stand_in, pixels = gpu_path(blobs, budget=budget)
    assert [i for i, _ in pixels.jpegs] == [0, 1] and stand_in.calls == [2]
    assert torch.equal(out, expected(blobs, {0, 1}))


def test_errors_are_the_pillow_paths_400s():
    bad = headers_only_jpeg()
    for blobs, words in (
        ([jpeg(64, 48), jpeg(30, 30), bad], "image 2: cannot decode image"),  # nvJPEG and Pillow refuse it
        ([jpeg(64, 48), corpus.jpeg_claiming(2000, 2000)], "image 1: image is 2000x2000 pixels, over"),
        ([corpus.png(0), b""], "image 1: empty image"),
    ):
        with pytest.raises(InvalidImage) as g:
            gpu_path(blobs, refuse=(bad,))
        with pytest.raises(InvalidImage) as p:
            run(Preprocessor(CFG, LIMITS, threads=2), blobs)
        assert str(g.value) == str(p.value) and str(g.value).startswith(words), (str(g.value), str(p.value))


# --------------------------------------------------------------------------------- scheduler


def test_stage_images_gathers_requests_from_host_and_device():
    """GPU-decoded requests arrive on the device, others on the host: the batch is one device tensor
    ('meta' stands in for CUDA here); all on the host, it is their concatenation in order."""
    host = torch.arange(2 * 3 * 4 * 4, dtype=torch.int64).to(torch.uint8).view(2, 3, 4, 4)
    dev = torch.zeros(1, 3, 4, 4, dtype=torch.uint8, device="meta")
    mixed = stage_images([host, dev], torch.device("meta"))
    assert mixed.device.type == "meta" and mixed.shape == (3, 3, 4, 4)
    cpu = stage_images([host[1:], host[:1]], torch.device("cpu"))
    assert torch.equal(cpu, torch.cat([host[1:], host[:1]]))


# ----------------------------------------------------------------------------------- on a GPU

needs_gpu_decode = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("torchvision") is None,
    reason="needs a CUDA device and torchvision",
)


@pytest.mark.gpu
@needs_gpu_decode
def test_nvjpeg_matches_pillow_within_a_few_levels():
    """Real nvJPEG: baseline 4:2:0 and 4:4:4, progressive, grayscale, sizes at and far above the GPU
    path's minimum (2x CFG's resize side of 37), mixed with images that take the Pillow path (PNG, CMYK,
    too small). Tolerance: nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's; after the
    downscale, photo-like rows stay within a level on average (measured 0.05-0.4 on an H200)."""
    blobs = [
        jpeg(640, 480, 1, quality=90),
        jpeg(480, 640, 2, quality=90, subsampling=0),
        jpeg(333, 97, 3, quality=85, progressive=True),
        corpus.encoded(photo(120, 90, 4).convert("L"), "JPEG", quality=90),
        jpeg(74, 74, 5, quality=95),
        jpeg(80, 300, 6, quality=90),
        jpeg(1536, 1024, 7, quality=80),
        corpus.png(8, (50, 40)),
        corpus.cmyk_jpeg(),
        jpeg(37, 37, 5, quality=95),
        jpeg(21, 17, 6, quality=90),
    ]
    limits = ImageLimits(max_bytes=10_000_000, max_pixels=10_000_000)
    dec = GpuDecoder("cuda", CFG, limits)
    assert dec.available, dec.reason
    on_gpu = [gpu_ineligible(b, limits, 74) is None for b in blobs]
    assert on_gpu == [True] * 7 + [False] * 4
    pixels = run(Preprocessor(CFG, limits, threads=2, gpu_jpegs=True), blobs)
    assert [i for i, _ in pixels.jpegs] == list(range(7))
    out = dec.complete(pixels.images, pixels.jpegs)
    assert out.device.type == "cuda" and out.shape == (len(blobs), 3, CFG.img_size, CFG.img_size)
    ref = torch.stack([eval_transform(decode_image(b, limits), CFG) for b in blobs])
    diff = (out.cpu().int() - ref.int()).abs()  # (n, 3, S, S)
    per_image = [(d.max().item(), round(d.float().mean().item(), 3)) for d in diff]
    print("nvJPEG vs Pillow, (max, mean) per image:", per_image)
    assert diff[7:].max().item() == 0, per_image  # PNG, CMYK and small JPEGs took the Pillow path: exact
    assert all(m <= 1.0 and mx <= 16 for mx, m in per_image), per_image
    # Two requests at once from two threads (the lock and the decode stream): same rows.
    flipped = run(Preprocessor(CFG, limits, threads=2, gpu_jpegs=True), blobs[::-1])
    with ThreadPoolExecutor(2) as pool:
        a = pool.submit(dec.complete, pixels.images, pixels.jpegs)
        b = pool.submit(dec.complete, flipped.images, flipped.jpegs)
        assert torch.equal(a.result(), out) and torch.equal(b.result(), out.flip(0))
