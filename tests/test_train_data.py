"""Training data: the embedded digits, ImageFolder reading (bad input included), deterministic batches."""

import numpy as np
import pytest
import torch
from PIL import Image

from train.data import DigitsDataset, ImageFolderDataset, center_crop_resize, epoch_batches, load_mnist, scan_image_folder


def test_embedded_mnist():
    images, labels = load_mnist()
    assert images.shape == (5000, 1, 32, 32) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [500] * 10
    # 28x28 digits zero-padded by 2 on every side
    assert images[:, :, :2].max() == 0 and images[:, :, -2:].max() == 0 and images[..., :2].max() == 0
    assert images.float().mean().item() == pytest.approx(0.1307 * 255 * (28 / 32) ** 2, abs=1.5)  # MNIST mean, padded


def test_digits_batches_and_flips():
    data = DigitsDataset()
    batch = data[[(0, False), (0, True), (4999, False)]]
    assert batch["image"].shape == (3, 1, 32, 32)
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    torch.testing.assert_close(batch["image"][1], batch["image"][0].flip(-1))
    assert batch["label"].tolist() == [0, 0, 9]


def test_epoch_batches_are_deterministic_and_split_across_ranks():
    a = epoch_batches(100, 8, epoch=3, seed=1)
    assert a == epoch_batches(100, 8, epoch=3, seed=1)
    assert a != epoch_batches(100, 8, epoch=4, seed=1)
    assert len(a) == 12 and all(len(b) == 8 for b in a)
    rank0 = {i for b in epoch_batches(100, 4, 0, 0, rank=0, world_size=2) for i, _ in b}
    rank1 = {i for b in epoch_batches(100, 4, 0, 0, rank=1, world_size=2) for i, _ in b}
    assert not rank0 & rank1 and len(rank0) == len(rank1) == 48
    flips = [f for b in a for _, f in b]
    assert 0.3 < sum(flips) / len(flips) < 0.7
    assert not any(f for b in epoch_batches(100, 8, 3, 1, hflip=False) for _, f in b)
    with pytest.raises(ValueError, match="lower --batch-size"):
        epoch_batches(10, 8, 0, 0, world_size=2)


def _save(path, mode, size, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


@pytest.fixture
def messy_folder(tmp_path):
    """Three classes with mixed sizes and modes, plus files that must be skipped."""
    root = tmp_path / "data"
    _save(root / "cat" / "a.png", "RGB", (40, 20), (255, 0, 0))
    _save(root / "cat" / "b.jpg", "L", (17, 33), 128)
    _save(root / "dog" / "c.png", "RGBA", (64, 64), (0, 255, 0, 128))
    _save(root / "dog" / "d.png", "P", (30, 30), 3)
    Image.fromarray(np.full((24, 24), 40000, dtype=np.uint16)).save(root / "dog" / "e.png")
    _save(root / "owl" / "f.jpeg", "CMYK", (20, 20), (0, 0, 0, 0))
    (root / "owl" / "notes.txt").write_text("not an image")
    (root / "owl" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "owl" / "fake.jpg").write_text("text with an image extension")
    (root / "stray.png").write_bytes(b"")
    return root


def test_image_folder_converts_and_skips(messy_folder):
    scan = scan_image_folder(messy_folder)
    assert scan.classes == ["cat", "dog", "owl"]
    assert len(scan.files) == 6
    assert scan.skipped == {"not an image": 1, "unreadable image": 2, "outside a class folder": 1}
    for channels in (1, 3):
        data = ImageFolderDataset(messy_folder, image_size=16, channels=channels)
        batch = data[[(i, False) for i in range(len(data))]]
        assert batch["image"].shape == (6, channels, 16, 16)
        assert batch["label"].tolist() == [0, 0, 1, 1, 1, 2]
        assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    red = ImageFolderDataset(messy_folder, 16, 3)[[(0, False)]]["image"][0]
    torch.testing.assert_close(red[:, 8, 8], torch.tensor([1.0, -1.0, -1.0]))


def test_image_folder_replaces_files_corrupt_at_load_time(messy_folder):
    data = ImageFolderDataset(messy_folder, 8, 3)
    (messy_folder / "cat" / "a.png").write_bytes((messy_folder / "cat" / "a.png").read_bytes()[:60])  # truncate body
    batch = data[[(0, False)]]
    assert batch["label"].tolist() == [0]  # replaced by the next file (cat/b.jpg)
    assert data.skipped["corrupt image data"] == 1


def test_center_crop_resize():
    image = Image.new("L", (60, 20), 0)
    image.paste(255, (20, 0, 40, 20))  # white centre square
    out = np.asarray(center_crop_resize(image, 10))
    assert out.shape == (10, 10) and out.min() == 255


def test_missing_and_empty_data_dirs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan_image_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class subfolders"):
        scan_image_folder(tmp_path / "empty")
    (tmp_path / "junk" / "a").mkdir(parents=True)
    (tmp_path / "junk" / "a" / "x.txt").write_text("x")
    (tmp_path / "junk" / "a" / "y.png").write_text("not a png")
    with pytest.raises(ValueError, match="no usable images.*not an image.*unreadable"):
        scan_image_folder(tmp_path / "junk")
