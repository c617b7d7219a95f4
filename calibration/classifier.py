"""The digit classifier of `python -m train`, wrapped to judge uint8 samples of MNIST packages."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.manifest import load_manifest

MNIST_IMAGE = {"channels": 1, "height": 32, "width": 32}


def is_mnist_package(manifest: dict) -> bool:
    image = manifest.get("image") or {}
    return manifest["classes"]["num_classes"] == 10 and all(image.get(k) == v for k, v in MNIST_IMAGE.items())


def package_classifier(package: str | Path):
    """A callable uint8 (N, 32, 32, 1) -> labels for packages trained on the embedded digits, else None."""
    if not is_mnist_package(load_manifest(package)):
        return None
    import torch

    from train.classifier import load_classifier

    model, _ = load_classifier()

    def classify(images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        with torch.no_grad():
            return model(x).argmax(1).numpy()

    return classify
