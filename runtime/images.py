"""Images out of the sampler: float -> uint8 NHWC, a grid, and a PNG writer on zlib alone (no PIL)."""

import struct
import zlib
from pathlib import Path

import numpy as np


def to_uint8(images: np.ndarray, value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """(N, C, H, W) floats in `value_range` -> (N, H, W, C) uint8, clipped and rounded like diffusers."""
    low, high = value_range
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {images.shape}")
    unit = np.clip((images.astype(np.float32) - low) / (high - low), 0.0, 1.0)
    return np.rint(unit * 255.0).astype(np.uint8).transpose(0, 2, 3, 1)


def image_grid(images: np.ndarray, columns: int, padding: int = 2) -> np.ndarray:
    """Tile (N, H, W, C) uint8 images row by row into one (rows*(H+p)+p, columns*(W+p)+p, C) image."""
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images of shape (N, H, W, C), got {images.dtype} {images.shape}")
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    count, height, width, channels = images.shape
    columns = min(columns, count)
    rows = -(-count // columns)
    grid = np.zeros(
        (rows * (height + padding) + padding, columns * (width + padding) + padding, channels), np.uint8
    )
    for index, image in enumerate(images):
        top = padding + (index // columns) * (height + padding)
        left = padding + (index % columns) * (width + padding)
        grid[top : top + height, left : left + width] = image
    return grid


PNG_COLOR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> grey, grey+alpha, RGB, RGBA


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of an (H, W) or (H, W, C) uint8 image, C in 1..4; 8 bits, no filtering."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in PNG_COLOR_TYPES:
        raise ValueError(f"PNG needs uint8 (H, W, C) with C in 1..4, got {image.dtype} {image.shape}")
    height, width, channels = image.shape
    rows = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, width * channels)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, PNG_COLOR_TYPES[channels], 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
        + chunk(b"IEND", b"")
    )


def write_png(path: str | Path, image: np.ndarray) -> Path:
    """Write `image` (see encode_png) to `path`, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(image))
    return path
