"""vae_decoder.onnx: latent -> image in [0, 1], with the 1/scaling_factor and the range mapping inside.

Putting both inside the graph means the runtime feeds the sampler's latents as they are and gets a
displayable image back, whatever VAE the package came with. The decoder's nearest-2x upsamplers are
exported in their phase form (exporter/upsample.py): same image, 4/9 of their multiply-adds. The decoder
stays float32: fp16 VAE decoders are the classic source of NaN / black images (peers_and_pitfalls.md,
pain point 1).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from exporter import onnx_io
from exporter.upsample import phase_upsamplers


class DecodeToImage(nn.Module):
    """image = clamp((decode(latent / scaling_factor + shift) + 1) / 2, 0, 1)."""

    def __init__(self, vae: nn.Module, scaling_factor: float, shift_factor: float | None = None):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = float(shift_factor or 0.0)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        z = latent / self.scaling_factor + self.shift_factor
        image = self.vae.decode(z, return_dict=False)[0]
        return ((image + 1.0) / 2.0).clamp(0.0, 1.0)


def load_vae(path: str | Path) -> nn.Module:
    """A diffusers AutoencoderKL directory (or a pipeline directory holding vae/)."""
    from diffusers import AutoencoderKL

    path = Path(path)
    if (path / "vae" / "config.json").is_file():
        path = path / "vae"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a diffusers AutoencoderKL directory (no config.json)")
    # low_cpu_mem_usage needs `accelerate`; asking for the plain load up front skips diffusers' advice to install it
    return AutoencoderKL.from_pretrained(path, low_cpu_mem_usage=False).float().eval()


def decoded_shape(vae: nn.Module, latent_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """(channels, height, width) of the decoded image: 2x upsampling per up block after the first."""
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    return vae.config.out_channels, latent_shape[1] * scale, latent_shape[2] * scale


def export_vae_decoder(
    vae: nn.Module,
    scaling_factor: float,
    latent_shape: tuple[int, int, int],
    path: str | Path,
    opset: int,
) -> dict:
    """Export the decoder (dynamic batch) to `path`; returns the manifest's vae_decoder entry (without hashes)."""
    channels, h, w = latent_shape
    if vae.config.latent_channels != channels:
        raise ValueError(
            f"VAE latent_channels={vae.config.latent_channels} does not match the denoiser's {channels} channels"
        )
    decoder_vae, _ = phase_upsamplers(vae)
    module = DecodeToImage(decoder_vae, scaling_factor, getattr(vae.config, "shift_factor", None)).eval()
    latent = torch.randn(2, channels, h, w, generator=torch.Generator().manual_seed(0))
    model = onnx_io.export_module(module, (latent,), ["latent"], ["image"], opset, dynamic_batch=True)
    external = onnx_io.save_model(model, path)
    onnx_io.check_model(path)
    return {
        "file": Path(path).name,
        "external_data": external,
        "input": "latent",
        "output": "image",
        "inputs": onnx_io.io_specs(model.graph.input),
        "outputs": onnx_io.io_specs(model.graph.output),
        "scaling_factor": float(scaling_factor),
        "shift_factor": float(getattr(vae.config, "shift_factor", None) or 0.0),
        "output_range": [0, 1],
        "precision": "fp32",
    }
