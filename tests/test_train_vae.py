"""The digit VAE: diffusers layout, scaling factor = 1 / latent std, loading rules."""

import json

import pytest
import torch

from train.vae import VaeRecipe, decode, load_vae, posterior, train_vae


def test_train_save_and_load(tmp_path):
    images = torch.rand(32, 1, 32, 32) * 2 - 1
    recipe = VaeRecipe(block_out_channels=(8, 8, 8), norm_num_groups=4, steps=3, batch_size=4)
    out = train_vae(images, tmp_path / "vae", recipe, progress=False)
    info = json.loads((out / "training.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL" and config["scaling_factor"] == pytest.approx(info["scaling_factor"])
    vae, scaling_factor = load_vae(out)
    with torch.no_grad():
        mean, std = posterior(vae, images)
        assert mean.shape == (32, 4, 8, 8)  # 32x32x1 -> 8x8x4
        # the factor was measured on sampled latents of these images: their scaled std is ~1
        sampled = (mean + std * torch.randn_like(std)) * scaling_factor
        assert sampled.std().item() == pytest.approx(1.0, rel=0.1)
        assert decode(vae, sampled, scaling_factor).shape == (32, 1, 32, 32)
    assert not list(tmp_path.glob(".vae*"))


def test_load_rejects_other_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a diffusers AutoencoderKL"):
        load_vae(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="only AutoencoderKL"):
        load_vae(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "shift_factor": 0.1159}))
    with pytest.raises(ValueError, match="shift_factor"):
        load_vae(tmp_path)


def test_wrong_image_shape():
    with pytest.raises(ValueError, match="expects"):
        train_vae(torch.zeros(4, 3, 32, 32), "unused", VaeRecipe(steps=1), progress=False)
