"""Checkpoint directories: layout, round trip, atomic replacement, full disk, interrupted swaps."""

import errno
import json

import pytest
import torch

import models
from train import checkpoint


def _model(seed: int):
    torch.manual_seed(seed)
    model = models.create_model("dit_tiny_2", input_size=8, in_channels=4, num_classes=10, depth=1, hidden_size=32, num_heads=2)
    for p in model.parameters():  # leave the zero init so the weights identify the seed
        p.data.normal_()
    return model


def _config(model):
    return {"format": checkpoint.FORMAT, "version": checkpoint.VERSION,
            "model": {"name": model.name, "kwargs": dict(model.config)}, "attention": dict(model.attention_config),
            "diffusion": {"num_timesteps": 1000, "beta_schedule": "linear", "learn_sigma": True},
            "vae": {"kind": "none"}, "cfg_channels": 3}


def _save(path, model, step):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1])).sum().backward()
    optimizer.step()
    return checkpoint.save_checkpoint(path, _config(model), model,
                                      resume={"model": model, "optimizer": optimizer, "state": {"step": step}})


def test_round_trip(tmp_path):
    model = _model(0)
    path = _save(tmp_path / "ckpt", model, step=7)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "resume"]
    loaded, config = checkpoint.load_model(path)
    assert config["model"]["kwargs"]["hidden_size"] == 32
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    fresh = _model(1)
    optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    assert checkpoint.load_resume(path, fresh, optimizer)["step"] == 7
    assert [s["step"].item() for s in optimizer.state_dict()["state"].values()] == [1.0] * len(optimizer.state)
    assert not list(tmp_path.glob(".ckpt*"))  # no temporary directories left


def test_full_disk_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = _save(tmp_path / "ckpt", _model(0), step=1)
    before = (path / "model.safetensors").read_bytes()
    real_write = checkpoint.write_bytes
    calls = []

    def failing_write(target, data):
        calls.append(target)
        if len(calls) == 2:  # config.json succeeds, the weights hit a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(target, data)

    monkeypatch.setattr(checkpoint, "write_bytes", failing_write)
    with pytest.raises(checkpoint.CheckpointError, match="no space left on device.*previous checkpoint.*intact"):
        _save(tmp_path / "ckpt", _model(1), step=2)
    assert (path / "model.safetensors").read_bytes() == before
    assert json.loads((path / "resume" / "state.json").read_text())["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_interrupted_swap_is_recovered(tmp_path):
    path = _save(tmp_path / "ckpt", _model(0), step=3)
    # a crash between the two renames leaves only .ckpt.old
    path.rename(tmp_path / ".ckpt.old")
    config = checkpoint.read_config(tmp_path / "ckpt")
    assert config["format"] == checkpoint.FORMAT and (tmp_path / "ckpt" / "resume").is_dir()


def test_mismatched_weights_are_rejected(tmp_path):
    path = _save(tmp_path / "ckpt", _model(0), step=1)
    config = json.loads((path / "config.json").read_text())
    config["model"]["kwargs"]["depth"] = 2
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(checkpoint.CheckpointError, match="does not fit"):
        checkpoint.load_model(path)
    (path / "config.json").write_text("{}")
    with pytest.raises(checkpoint.CheckpointError, match="not a dit-edge-checkpoint"):
        checkpoint.read_config(path)
    with pytest.raises(checkpoint.CheckpointError, match="no config.json"):
        checkpoint.read_config(tmp_path)
