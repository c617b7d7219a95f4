"""uint8 conversion, grid layout and the zlib PNG writer (read back by an independent decoder)."""

import struct
import zlib

import numpy as np
import pytest

from runtime.images import encode_png, image_grid, to_uint8, write_png


def decode_png(data: bytes) -> np.ndarray:
    """Minimal reader for the unfiltered 8-bit PNGs we write; checks signature and every CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, chunks = 8, {}
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind, body = data[position + 4 : position + 8], data[position + 8 : position + 8 + length]
        (crc,) = struct.unpack(">I", data[position + 8 + length : position + 12 + length])
        assert crc == zlib.crc32(kind + body)
        chunks.setdefault(kind, b"")
        chunks[kind] += body
        position += 12 + length
    width, height, depth, color, *_ = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    channels = {0: 1, 4: 2, 2: 3, 6: 4}[color]
    assert depth == 8 and b"IEND" in chunks
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(height, 1 + width * channels)
    assert not rows[:, 0].any()  # filter type 0 on every row
    return rows[:, 1:].reshape(height, width, channels)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_png_round_trip(channels):
    image = np.random.default_rng(channels).integers(0, 256, (5, 7, channels), dtype=np.uint8)
    np.testing.assert_array_equal(decode_png(encode_png(image)), image)


def test_png_is_readable_by_pillow(tmp_path):
    image_module = pytest.importorskip("PIL.Image")
    image = np.random.default_rng(0).integers(0, 256, (9, 6, 3), dtype=np.uint8)
    path = write_png(tmp_path / "sub" / "x.png", image)
    with image_module.open(path) as loaded:
        assert loaded.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(loaded), image)


def test_to_uint8_clips_rounds_and_transposes():
    images = np.array([-0.5, 0.0, 0.5, 1.0, 1.5, 0.2], np.float32).reshape(1, 1, 2, 3)
    np.testing.assert_array_equal(to_uint8(images)[0, :, :, 0], [[0, 0, 128], [255, 255, 51]])
    np.testing.assert_array_equal(to_uint8(images * 2 - 1, (-1.0, 1.0)), to_uint8(images))
    assert to_uint8(np.zeros((2, 3, 4, 5), np.float32)).shape == (2, 4, 5, 3)


def test_grid_layout():
    images = np.stack([np.full((2, 3, 1), value, np.uint8) for value in (10, 20, 30)])
    grid = image_grid(images, columns=2, padding=1)
    assert grid.shape == (2 * 3 + 1, 2 * 4 + 1, 1)
    assert grid[1, 1, 0] == 10 and grid[1, 5, 0] == 20 and grid[4, 1, 0] == 30
    assert grid[0].max() == 0 and grid[4, 5, 0] == 0  # padding and the empty cell stay black


def test_bad_images_are_refused():
    with pytest.raises(ValueError, match="C in 1..4"):
        encode_png(np.zeros((2, 2, 5), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((2, 2, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        to_uint8(np.zeros((2, 2, 3)))
    with pytest.raises(ValueError, match="columns must be >= 1"):
        image_grid(np.zeros((1, 2, 2, 3), np.uint8), columns=0)
