"""Pre-extracted VAE latents (`--cache-latents`): encode every image and its mirror once, train from the cache.

As in CLEAR's recipe the cache holds the posterior mean and std, so every step still draws a fresh latent
mean + std * eps (the same distribution as encoding on the fly). Stored as float16 .npy files opened with
mmap, so an ImageNet-scale cache need not fit in memory; `meta.json` records what was encoded and a
cache that does not match the current data/VAE is rebuilt. With torchrun every rank encodes its share.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from .distributed import Dist
from .vae import posterior


class LatentDataset(torch.utils.data.Dataset):
    """Batches {"mean", "std": (B, C, h, w) unscaled, "label": (B,)} for (index, flip) keys."""

    def __init__(self, mean: np.ndarray, std: np.ndarray, labels: torch.Tensor, classes: list[str]):
        self.mean, self.std, self.labels, self.classes = mean, std, labels, classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, keys: list[tuple[int, bool]]) -> dict[str, torch.Tensor]:
        index = np.array([k[0] for k in keys])
        flip = np.array([int(k[1]) for k in keys])
        return {
            "mean": torch.from_numpy(self.mean[index, flip].astype(np.float32)),
            "std": torch.from_numpy(self.std[index, flip].astype(np.float32)),
            "label": self.labels[torch.from_numpy(index)],
        }


@torch.no_grad()
def build_latent_cache(dataset, vae, directory: str | Path, description: dict, dist: Dist, batch_size: int = 64) -> LatentDataset:
    """Encode `dataset` (both flips) with `vae` into `directory`, or reuse a matching cache there."""
    directory = Path(directory)
    meta_file = directory / "meta.json"
    n = len(dataset)
    description = {**description, "num_items": n}
    if not (meta_file.is_file() and json.loads(meta_file.read_text()) == description):
        if dist.is_main:
            directory.mkdir(parents=True, exist_ok=True)
            meta_file.unlink(missing_ok=True)
            probe = posterior(vae, dataset[[(0, False)]]["image"].to(dist.device))[0]
            shape = (n, 2, *probe.shape[1:])
            for name in ("mean", "std"):
                np.lib.format.open_memmap(directory / f"{name}.npy.tmp", mode="w+", dtype=np.float16, shape=shape).flush()
        dist.barrier()
        arrays = {name: np.load(directory / f"{name}.npy.tmp", mmap_mode="r+") for name in ("mean", "std")}
        mine = list(range(dist.rank, n, dist.world_size))
        for start in range(0, len(mine), batch_size):
            chunk = mine[start : start + batch_size]
            for flip in (0, 1):
                images = dataset[[(i, bool(flip)) for i in chunk]]["image"].to(dist.device)
                mean, std = posterior(vae, images)
                arrays["mean"][chunk, flip] = mean.cpu().numpy().astype(np.float16)
                arrays["std"][chunk, flip] = std.cpu().numpy().astype(np.float16)
        for array in arrays.values():
            array.flush()
        del arrays
        dist.barrier()
        if dist.is_main:
            for name in ("mean", "std"):
                with open(directory / f"{name}.npy.tmp", "rb") as f:
                    os.fsync(f.fileno())
                os.replace(directory / f"{name}.npy.tmp", directory / f"{name}.npy")
            meta_file.write_text(json.dumps(description, indent=2))
        dist.barrier()
    return LatentDataset(
        np.load(directory / "mean.npy", mmap_mode="r"),
        np.load(directory / "std.npy", mmap_mode="r"),
        dataset.labels,
        dataset.classes,
    )
