"""A small digit CNN that judges generated MNIST samples (class accuracy, Frechet distance of its features).

Trained once on 4,500 of the embedded digits (every 10th digit, 50 per class since the file is sorted by
label, is held out to measure its own accuracy) and cached, so every
run is judged by the same network. Random shifts of up to 2 pixels make it robust to off-centre samples.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .data import load_mnist, to_model_range

CACHE_VERSION = 1
HELD_OUT_EVERY = 10


def cache_dir() -> Path:
    """$DIT_EDGE_CACHE, else ~/.cache/dit-edge."""
    return Path(os.environ.get("DIT_EDGE_CACHE", Path.home() / ".cache" / "dit-edge"))


class DigitClassifier(nn.Module):
    """Two conv + pool stages and a 128-d feature layer; input (N, 1, 32, 32) in [-1, 1]."""

    feature_dim = 128

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 8 * 8, self.feature_dim)
        self.head = nn.Linear(self.feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1:] != (1, 32, 32):
            raise ValueError(f"the digit classifier takes (N, 1, 32, 32) images, got {tuple(x.shape)}")
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def random_shift(x: torch.Tensor, generator: torch.Generator, pixels: int = 2) -> torch.Tensor:
    """Translate each image by up to `pixels` in x and y (zero fill = background -1)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pixels,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * pixels + 1, (2, n), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None].expand(n, h, w)
    cols = (dx[:, None] + torch.arange(w))[:, None, :].expand(n, h, w)
    return padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)


@torch.no_grad()
def accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    model.eval()
    predictions = torch.cat([model(images[i : i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)])
    return (predictions == labels).float().mean().item()


@torch.enable_grad()
def train_classifier(epochs: int = 8, batch_size: int = 64, lr: float = 3e-3, seed: int = 0):
    """Train on 4,500 digits; returns (model, accuracy on the 500 held out)."""
    images, labels = load_mnist(32)
    x, y = to_model_range(images), labels
    held_out = torch.arange(len(y)) % HELD_OUT_EVERY == 0
    x_train, y_train = x[~held_out], y[~held_out]
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * max(1, len(x_train) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=generator)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            index = order[i : i + batch_size]
            loss = F.cross_entropy(model(random_shift(x_train[index], generator)), y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return model.eval(), accuracy(model, x[held_out], y[held_out])


def load_classifier(epochs: int = 8, cache: Path | None = None) -> tuple[DigitClassifier, float]:
    """The cached classifier and its held-out accuracy; trains and caches it (atomically) on first use.

    The epoch count is part of the cache key, so a quick classifier (tests) never replaces the real one.
    """
    directory = cache or cache_dir()
    weights = directory / f"digit_classifier_v{CACHE_VERSION}_e{epochs}.safetensors"
    info = weights.with_suffix(".json")
    if weights.is_file() and info.is_file():
        model = DigitClassifier()
        model.load_state_dict(load_file(weights))
        return model.eval(), json.loads(info.read_text())["held_out_accuracy"]
    model, held_out = train_classifier(epochs=epochs)
    directory.mkdir(parents=True, exist_ok=True)
    for path, write in (
        (weights, lambda p: save_file(model.state_dict(), p)),
        (info, lambda p: Path(p).write_text(json.dumps({"held_out_accuracy": held_out, "epochs": epochs}))),
    ):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        write(str(tmp))
        os.replace(tmp, path)
    return model, held_out
