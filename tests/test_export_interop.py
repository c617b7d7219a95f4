"""Interop sources: a diffusers DiTPipeline / DiTTransformer2DModel directory and official DiT checkpoints."""
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

import models
from exporter import sources
from exporter.manifest import load_manifest, validate_manifest
from exporter.package import ExportOptions, export_package
from models.official import CheckpointMismatchError


def _tiny_transformer() -> DiTTransformer2DModel:
    # sizes of diffusers' own DiT model test: sample 8, patch 2, 1 layer, 2 heads x 4
    torch.manual_seed(0)
    model = DiTTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=1,
                                  attention_head_dim=4, num_attention_heads=2, num_embeds_ada_norm=8,
                                  norm_num_groups=1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    torch.manual_seed(1)
    vae = AutoencoderKL(block_out_channels=[8, 16], norm_num_groups=4, latent_channels=4, layers_per_block=1,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    scheduler = DDIMScheduler(beta_schedule="linear", clip_sample=False)
    path = tmp_path_factory.mktemp("diffusers") / "dit-pipeline"
    DiTPipeline(transformer=_tiny_transformer(), vae=vae.eval(), scheduler=scheduler).save_pretrained(path)
    return path


def test_diffusers_pipeline_exports_with_its_semantics(pipeline_dir, tmp_path):
    source = sources.load_source(diffusers=pipeline_dir)
    assert source.cfg_channels == "all" and source.scheduler["_class_name"] == "DDIMScheduler"
    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor([0.0, 420.0, 999.0])
    y = torch.tensor([0, 8, 5])  # 8 = null label (num_embeds_ada_norm)
    reference = DiTTransformer2DModel.from_pretrained(pipeline_dir / "transformer").eval()
    with torch.no_grad():
        ref = reference(x, timestep=t, class_labels=y).sample.numpy()

    manifest = export_package(source, tmp_path / "pkg", ExportOptions(opset=18))
    validate_manifest(load_manifest(tmp_path / "pkg"))
    assert manifest["cfg"] == {"channels": "all"}
    assert manifest["classes"] == {"num_classes": 8, "null_label": 8}
    assert manifest["model"]["source"]["kind"] == "diffusers" and manifest["learn_sigma"] is True
    assert manifest["scheduler"]["_class_name"] == "DDIMScheduler" and manifest["scheduler"]["clip_sample"] is False
    assert manifest["diffusion"]["beta_schedule"] == "linear" and manifest["diffusion"]["beta_end"] == 0.02
    assert manifest["image"] == {"channels": 3, "height": 16, "width": 16, "range": [0, 1]}
    assert manifest["exporter"]["opset"] == 18 and manifest["custom_ops"] == []

    got = ort.InferenceSession(str(tmp_path / "pkg/denoiser.onnx")).run(
        None, {"x": x.numpy(), "t": t.numpy(), "y": y.numpy()})[0]
    assert got.shape == (3, 8, 8, 8)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_bare_transformer_directory(tmp_path):
    _tiny_transformer().save_pretrained(tmp_path / "transformer-only")
    source = sources.from_diffusers(tmp_path / "transformer-only")
    assert source.vae is None and source.scheduler is None and source.cfg_channels == "all"
    assert source.latent == (4, 8, 8) and source.num_classes == 8 and source.family == "dit"


def test_not_a_diffusers_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a diffusers DiTPipeline directory"):
        sources.from_diffusers(tmp_path)


def test_official_checkpoint_loads_ema_and_latent_size(tmp_path):
    torch.manual_seed(2)
    model = models.create_model("dit_tiny_2", input_size=16)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    torch.save({"ema": model.state_dict(), "model": {}}, tmp_path / "0001000.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a real checkpoint: no random-weights warning
        source = sources.load_source(model="dit_tiny_2", official=tmp_path / "0001000.pt")
    assert source.latent == (4, 16, 16) and source.cfg_channels == 3 and source.origin["kind"] == "official"
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([3.0, 900.0]), torch.tensor([7, 1000])
    with torch.no_grad():
        torch.testing.assert_close(source.model(x, t, y), model.eval()(x, t, y))
    with pytest.raises(CheckpointMismatchError, match="shape mismatches"):
        sources.load_source(model="dit_s_2", official=tmp_path / "0001000.pt")


def test_only_one_source_at_a_time(tmp_path):
    with pytest.raises(ValueError, match="at most one of --checkpoint, --official, --diffusers"):
        sources.load_source(checkpoint=tmp_path, diffusers=tmp_path)
