"""load_official: checkpoint formats of the official DiT / U-DiT code, strict loading, mismatch reports."""
import argparse

import pytest
import torch
from safetensors.torch import save_file

from models import CheckpointMismatchError, create_model, load_official
from tests.test_models_dit import perturbed


def test_train_checkpoint_prefers_ema(tmp_path):
    model = perturbed(create_model("dit_tiny_2", input_size=8), seed=1)
    ema = perturbed(create_model("dit_tiny_2", input_size=8), seed=2)
    path = tmp_path / "0400000.pt"
    # what facebookresearch/DiT train.py writes: model, ema, opt and the argparse namespace
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": {}, "args": argparse.Namespace(
        model="DiT-S/2", image_size=64)}, path)
    loaded = load_official("dit_tiny_2", path)
    assert not loaded.training and loaded.input_size == 8  # latent size read from pos_embed
    x, t, y = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.tensor([1])
    torch.testing.assert_close(loaded(x, t, y), ema.eval()(x, t, y), rtol=0, atol=0)
    only_model = load_official("dit_tiny_2", {"model": model.state_dict()})
    torch.testing.assert_close(only_model(x, t, y), model.eval()(x, t, y), rtol=0, atol=0)


def test_bare_state_dict_safetensors_and_ddp_prefix(tmp_path):
    model = perturbed(create_model("udit_tiny", input_size=16))
    path = tmp_path / "udit.safetensors"
    save_file(model.state_dict(), str(path))
    x, t, y = torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.tensor([1])
    expected = model.eval()(x, t, y)
    torch.testing.assert_close(load_official("udit_tiny", path, input_size=16)(x, t, y), expected, rtol=0, atol=0)
    prefixed = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.testing.assert_close(load_official("udit_tiny", prefixed)(x, t, y), expected, rtol=0, atol=0)


def test_dit_input_size_from_checkpoint():
    state = create_model("dit_tiny_2", input_size=16).state_dict()
    assert load_official("dit_tiny_2", state).input_size == 16


def test_mismatch_lists_every_difference():
    state = create_model("dit_tiny_2", input_size=8).state_dict()
    del state["blocks.3.mlp.fc2.bias"]
    state["blocks.4.attn.qkv.weight"] = torch.zeros(1)
    state["final_layer.linear.weight"] = torch.zeros(16, 128)
    with pytest.raises(CheckpointMismatchError) as info:
        load_official("dit_tiny_2", state)
    message = str(info.value)
    assert "missing keys (1)" in message and "blocks.3.mlp.fc2.bias" in message
    assert "unexpected keys (1)" in message and "blocks.4.attn.qkv.weight" in message
    assert "shape mismatches (1)" in message and "final_layer.linear.weight: checkpoint (16, 128) vs model (32, 128)" in message
    with pytest.raises(CheckpointMismatchError, match="missing keys"):
        load_official("udit_tiny", create_model("dit_tiny_2", input_size=8).state_dict())


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_official("dit_tiny_2", "nope.pt")
