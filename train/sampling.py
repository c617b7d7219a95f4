"""Torch reference sampling for sample grids and metrics: respaced DDPM with classifier-free guidance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.diffusion import classifier_free_guidance, create_diffusion

from .vae import decode


@torch.no_grad()
def sample_latents(
    model: torch.nn.Module,
    labels: torch.Tensor,
    latent_shape: tuple[int, int, int],
    steps: int = 50,
    guidance_scale: float = 4.0,
    cfg_channels: int | str = 3,
    seed: int = 0,
    batch_size: int = 500,
    noise: torch.Tensor | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Latents for `labels` from the model's diffusion respaced to `steps` DDPM steps (learned variance).

    The noise comes from `seed` (or `noise`), drawn for all samples up front, so the result does not depend
    on `batch_size`; sampling noise per batch comes from a generator seeded with (seed, batch index).
    """
    model.eval()
    device = next(model.parameters()).device
    diffusion = create_diffusion(str(steps), learn_sigma=model.out_channels == 2 * model.in_channels)
    if noise is None:
        noise = torch.randn(len(labels), *latent_shape, generator=torch.Generator().manual_seed(seed))
    out = []
    for start in range(0, len(labels), batch_size):
        y = labels[start : start + batch_size].to(device)
        guided = classifier_free_guidance(model, y, guidance_scale, model.num_classes, cfg_channels)
        generator = torch.Generator(device).manual_seed(seed * 100_003 + start)
        out.append(
            diffusion.p_sample_loop(
                guided, noise[start : start + batch_size].shape, noise=noise[start : start + batch_size],
                generator=generator, device=device, progress=progress,
            ).cpu()
        )
    return torch.cat(out)


@torch.no_grad()
def latents_to_images(vae, scaling_factor: float, latents: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Decode scaled latents to images in [-1, 1]; pixel-space models (vae None) pass through, clamped."""
    if vae is None:
        return latents.clamp(-1.0, 1.0)
    device = next(vae.parameters()).device
    return torch.cat([decode(vae, latents[i : i + batch_size].to(device), scaling_factor).cpu() for i in range(0, len(latents), batch_size)])


def save_grid(images: torch.Tensor, columns: int, path: str | Path) -> Path:
    """Images in [-1, 1] (N, C, H, W) -> a PNG with `columns` per row and a 2-pixel gap."""
    n, c, h, w = images.shape
    rows = -(-n // columns)
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    grid = np.full((rows * (h + 2) + 2, columns * (w + 2) + 2, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        grid[2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + col * (w + 2) : 2 + col * (w + 2) + w] = pixels[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(tmp, format="PNG")
    tmp.replace(path)
    return path
