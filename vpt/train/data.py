"""Labelled image sets for `vpt train`: an ImageFolder directory or a `path,label` CSV.

Images are decoded once with the server's `decode_image` and kept in memory already resized to the
backbone's `resize_size` (the first, deterministic step of both `train_transform` and `eval_transform`),
so every epoch only crops and flips. Evaluation images are passed through `eval_transform` once and
cached as uint8 tensors: evaluation is then exactly the server's preprocessing, with no per-epoch cost.
Sets whose resized pixels exceed a memory budget are decoded from disk on every access instead
(DataLoader workers spread that cost).

Augmentation randomness is a pure function of (seed, epoch, sample index), so results do not depend on
the number of DataLoader workers.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from vpt.config import ViTConfig
from vpt.transforms import ImageDecodeError, _resize_shorter, decode_image, eval_transform, train_transform

# What torchvision's ImageFolder accepts, plus WebP/AVIF which Pillow reads too.
IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".ppm",
    ".bmp",
    ".pgm",
    ".tif",
    ".tiff",
    ".webp",
    ".gif",
    ".avif",
)


class DatasetError(ValueError):
    """The training data is unusable; the message names the file or row."""


@dataclass
class LabelledImages:
    """A list of images with integer targets into `classes`.

    `images[i]` is either a decoded RGB image or the path it is decoded from on access.
    """

    images: list[Image.Image | Path]  # decoded RGB images (pre-resized) or paths for lazy decoding
    targets: list[int]  # class index of each image, into `classes`
    classes: list[str]  # label names; the artifact's labels, in this order

    def __post_init__(self) -> None:
        if len(self.images) != len(self.targets):
            raise ValueError("images and targets differ in length")
        bad = [t for t in self.targets if not 0 <= t < len(self.classes)]
        if bad:
            raise ValueError(f"target {bad[0]} is outside 0..{len(self.classes) - 1}")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: Sequence[int]) -> LabelledImages:
        return LabelledImages(
            [self.images[i] for i in indices], [self.targets[i] for i in indices], self.classes
        )

    def counts(self) -> list[int]:
        return np.bincount(np.asarray(self.targets, dtype=np.int64), minlength=len(self.classes)).tolist()

    @classmethod
    def from_arrays(
        cls, images: np.ndarray, targets: Sequence[int], classes: Sequence[str]
    ) -> LabelledImages:
        """uint8 (N, H, W) greyscale or (N, H, W, 3) RGB arrays → images (for packaged data sets)."""
        if images.dtype != np.uint8:
            raise ValueError(f"images must be uint8, got {images.dtype}")
        pil = [Image.fromarray(a).convert("RGB") for a in images]
        return cls(list(pil), [int(t) for t in targets], list(classes))


def _read_image(path: Path) -> Image.Image:
    try:
        return decode_image(path.read_bytes())
    except ImageDecodeError as e:
        raise DatasetError(f"{path}: {e}") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read: {e}") from None


def scan_image_folder(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """ImageFolder layout: one sub-folder per class (sorted names are the labels), images inside."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetError(f"{root}: no class sub-folders (expected ImageFolder layout: DIR/<label>/<image>)")
    paths: list[Path] = []
    targets: list[int] = []
    for t, name in enumerate(classes):
        files = sorted(
            p for p in (root / name).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not files:
            raise DatasetError(f"{root / name}: class folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        paths += files
        targets += [t] * len(files)
    return paths, targets, classes


def scan_csv(path: Path) -> tuple[list[Path], list[str]]:
    """Rows of `path,label`; an optional `path,label` header; relative paths are relative to the CSV."""
    paths: list[Path] = []
    labels: list[str] = []
    with path.open(newline="", encoding="utf-8") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if lineno == 1 and [c.strip().lower() for c in row] == ["path", "label"]:
                continue
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                raise DatasetError(f"{path}:{lineno}: expected 'path,label', got {row!r}")
            p = Path(row[0].strip())
            paths.append(p if p.is_absolute() else path.parent / p)
            labels.append(row[1].strip())
    if not paths:
        raise DatasetError(f"{path}: no rows")
    return paths, labels


def load_labelled_images(
    source: str | Path,
    cfg: ViTConfig,
    classes: Sequence[str] | None = None,
    cache_bytes: int = 2 << 30,
) -> LabelledImages:
    """Read a data set, decoding every image once (or lazily when over `cache_bytes`).

    Args:
        source: an ImageFolder directory or a CSV file of `path,label`.
        cfg: the backbone's config (for the resize every transform starts with).
        classes: fix the label order (a validation set must use the training set's); None → from data.
        cache_bytes: budget for keeping resized images in memory.
    """
    source = Path(source)
    if source.is_dir():
        paths, targets, found = scan_image_folder(source)
        labels = [found[t] for t in targets]
    elif source.is_file():
        paths, labels = scan_csv(source)
    else:
        raise DatasetError(f"{source}: no such directory or CSV file")
    if classes is None:
        classes = sorted(set(labels))
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(labels) - index.keys())
    if unknown:
        raise DatasetError(f"{source}: labels {unknown[:5]} are not among the training classes")
    targets = [index[c] for c in labels]

    side = max(cfg.resize_size, cfg.img_size)
    images: list[Image.Image | Path] = []
    used = 0
    for p in paths:
        if used > cache_bytes:
            # Over budget: keep paths from here on (each access decodes again).
            images.append(p)
            continue
        img = _resize_shorter(_read_image(p), side)
        used += img.width * img.height * 3
        images.append(img)
    return LabelledImages(images, targets, list(classes))


def stratified_split(
    data: LabelledImages, val_fraction: float, seed: int
) -> tuple[LabelledImages, LabelledImages]:
    """Per-class random split (the paper holds out a random part of each FGVC train set as val).

    Every class keeps at least one training image and, when it has two or more, gives at least one
    to validation, so per-class validation accuracy is defined.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val fraction must be in (0, 1), got {val_fraction}")
    rng = random.Random(seed)
    train_idx: list[int] = []
    val_idx: list[int] = []
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(data.targets):
        by_class.setdefault(t, []).append(i)
    for t in sorted(by_class):
        idx = by_class[t]
        rng.shuffle(idx)
        n_val = min(len(idx) - 1, max(1, round(val_fraction * len(idx)))) if len(idx) > 1 else 0
        val_idx += idx[:n_val]
        train_idx += idx[n_val:]
    return data.subset(sorted(train_idx)), data.subset(sorted(val_idx))


def _materialise(item: Image.Image | Path, side: int) -> Image.Image:
    return item if isinstance(item, Image.Image) else _resize_shorter(_read_image(item), side)


class TrainImages(Dataset[tuple[torch.Tensor, int]]):
    """Augmented view (the paper's FGVC train transform). Index = epoch * len + sample, so the random
    crop/flip of a sample depends only on (seed, epoch, sample), not on worker scheduling."""

    def __init__(self, data: LabelledImages, cfg: ViTConfig, seed: int) -> None:
        self.data, self.cfg, self.seed = data, cfg, seed
        self.side = max(cfg.resize_size, cfg.img_size)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        n = len(self.data)
        epoch, i = divmod(index, n)
        rng = random.Random(f"{self.seed}/{epoch}/{i}")  # str seeds hash deterministically (sha512)
        img = _materialise(self.data.images[i], self.side)
        return train_transform(img, self.cfg, rng), self.data.targets[i]


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch, yielding `epoch * n + i` for `TrainImages`."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        offset = self.epoch * self.n
        return iter(offset + i for i in torch.randperm(self.n, generator=g).tolist())


class EvalImages(Dataset[tuple[torch.Tensor, int]]):
    """Evaluation view: exactly `eval_transform`, the function the server applies to every request.
    Computed once and cached when the images are in memory."""

    def __init__(self, data: LabelledImages, cfg: ViTConfig) -> None:
        self.data, self.cfg = data, cfg
        self.side = max(cfg.resize_size, cfg.img_size)
        self.cache: list[torch.Tensor | None] = [
            eval_transform(img, cfg) if isinstance(img, Image.Image) else None for img in data.images
        ]

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.cache[i]
        if x is None:
            x = eval_transform(_materialise(self.data.images[i], self.side), self.cfg)
        return x, self.data.targets[i]
