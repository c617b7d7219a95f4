"""Latent space: load any diffusers AutoencoderKL, or train a tiny one on the digits (`python -m train vae`).

Latents follow DiT/LDM: z = sample(posterior) * scaling_factor, images = decode(z / scaling_factor). For a VAE
trained here the scaling factor is 1 / std of the training latents, written into its config.json, so the
diffusion model sees unit-variance latents as with sd-vae-ft-ema (0.18215).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)


@dataclass
class VaeRecipe:
    """Tiny AutoencoderKL for 32x32 digits: three levels (32 -> 16 -> 8), 4 latent channels, no attention."""

    image_size: int = 32
    image_channels: int = 1
    block_out_channels: tuple[int, ...] = (16, 32, 64)
    latent_channels: int = 4
    norm_num_groups: int = 8
    steps: int = 300
    batch_size: int = 64
    lr: float = 2e-3
    kl_weight: float = 1e-4
    seed: int = 0

    def autoencoder_kwargs(self) -> dict:
        levels = len(self.block_out_channels)
        return dict(
            in_channels=self.image_channels,
            out_channels=self.image_channels,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=1,
            latent_channels=self.latent_channels,
            norm_num_groups=self.norm_num_groups,
            sample_size=self.image_size,
            mid_block_add_attention=False,
        )


def load_vae(path: str | Path):
    """A diffusers AutoencoderKL directory -> (model in eval mode, scaling_factor)."""
    from diffusers import AutoencoderKL

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a diffusers AutoencoderKL directory (no config.json)")
    config = json.loads((path / "config.json").read_text())
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ValueError(f"{path} holds a {config['_class_name']}, but only AutoencoderKL is supported")
    if config.get("shift_factor"):
        raise ValueError(f"{path} uses shift_factor={config['shift_factor']}; only scaling-factor VAEs (as DiT's) are supported")
    vae = AutoencoderKL.from_pretrained(path, low_cpu_mem_usage=False).eval().requires_grad_(False)
    return vae, float(vae.config.scaling_factor)


def posterior(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled latent mean and std of images in [-1, 1]."""
    dist = vae.encode(images).latent_dist
    return dist.mean, dist.std


def decode(vae, latents: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """Scaled latents -> images in [-1, 1] (clamped)."""
    return vae.decode(latents / scaling_factor).sample.clamp(-1.0, 1.0)


def save_atomic(vae, out_dir: Path, extra: dict) -> None:
    """save_pretrained into a temporary sibling, fsync, then rename over out_dir."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp, safe_serialization=True)
    (tmp / "training.json").write_text(json.dumps(extra, indent=2))
    for file in tmp.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def train_vae(images: torch.Tensor, out_dir: str | Path, recipe: VaeRecipe = VaeRecipe(), progress: bool = True) -> Path:
    """Train a tiny AutoencoderKL on images in [-1, 1] (N, C, S, S) with MSE + kl_weight * KL.

    The KL term (mean per latent element) keeps the latent smooth enough for a small diffusion model; the
    reconstruction error and the chosen scaling factor are written to training.json next to the weights.
    """
    from diffusers import AutoencoderKL
    from tqdm.auto import tqdm

    if images.shape[1:] != (recipe.image_channels, recipe.image_size, recipe.image_size):
        raise ValueError(
            f"VAE recipe expects ({recipe.image_channels}, {recipe.image_size}, {recipe.image_size}) images, "
            f"got {tuple(images.shape[1:])}"
        )
    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    vae = AutoencoderKL(**recipe.autoencoder_kwargs())
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=recipe.steps, pct_start=0.1)
    start = time.time()
    vae.train()
    bar = tqdm(range(recipe.steps), desc="vae", disable=not progress)
    for _ in bar:
        batch = images[torch.randint(0, len(images), (recipe.batch_size,), generator=generator)]
        dist = vae.encode(batch).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator)
        reconstruction = vae.decode(z).sample
        mse = (reconstruction - batch).pow(2).mean()
        kl = 0.5 * (dist.mean.pow(2) + dist.var - 1.0 - dist.logvar).mean()
        loss = mse + recipe.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(mse=f"{mse.item():.4f}", kl=f"{kl.item():.2f}")
    vae.eval()
    with torch.no_grad():
        means, stds = zip(*(posterior(vae, images[i : i + 500]) for i in range(0, len(images), 500)))
        latents = torch.cat(means) + torch.cat(stds) * torch.randn(torch.cat(means).shape, generator=generator)
        scaling_factor = 1.0 / latents.std().item()
        sample = images[:500]
        reconstruction_mse = (vae.decode(posterior(vae, sample)[0]).sample.clamp(-1, 1) - sample).pow(2).mean().item()
    vae.register_to_config(scaling_factor=scaling_factor)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(vae, out_dir, {
        "recipe": asdict(recipe), "scaling_factor": scaling_factor, "reconstruction_mse": reconstruction_mse,
        "seconds": round(time.time() - start, 1),
    })
    log.info("VAE saved to %s (scaling factor %.4f, reconstruction mse %.4f)", out_dir, scaling_factor, reconstruction_mse)
    return out_dir
