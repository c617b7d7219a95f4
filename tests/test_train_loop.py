"""The training run in-process with the tiny preset: outputs, resume equivalence, folder data, VAE latents, bad input."""

import dataclasses
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from train import checkpoint
from train.config import build_config
from train.loop import train
from train.precision import cpu_flags, native_bf16


def _run(tmp_path, name="run", **options):
    return train(build_config("tiny", options.pop("data", None), out=str(tmp_path / name), **options), progress=False)


def test_tiny_run_writes_a_complete_checkpoint(tmp_path):
    out = _run(tmp_path, steps=4, log_every=1)
    config = json.loads((out / "checkpoint" / "config.json").read_text())
    assert config["format"] == "dit-edge-checkpoint" and config["version"] == 1
    assert config["model"]["name"] == "dit_tiny_2"
    assert config["model"]["kwargs"] == {"input_size": 32, "patch_size": 8, "in_channels": 1, "hidden_size": 32,
                                         "depth": 1, "num_heads": 2, "mlp_ratio": 4.0, "class_dropout_prob": 0.1,
                                         "num_classes": 10, "learn_sigma": True}
    assert config["attention"] == {"kind": "full"}
    assert config["diffusion"] == {"num_timesteps": 1000, "beta_schedule": "linear", "learn_sigma": True}
    assert config["vae"]["kind"] == "none" and config["vae"]["image_channels"] == 1
    assert config["cfg_channels"] == "all" and config["data"]["kind"] == "mnist"
    ema, _ = checkpoint.load_model(out / "checkpoint")
    raw = load_file(out / "checkpoint" / "resume" / "model.safetensors")
    assert any(not torch.equal(v, raw[k]) for k, v in ema.state_dict().items())  # model.safetensors is the EMA
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in lines)
    assert (out / "samples.png").is_file() and (out / "samples" / "step_0000003.png").is_file() is False
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4


def test_resume_equals_an_uninterrupted_run(tmp_path):
    straight = _run(tmp_path, "straight", steps=6, ckpt_every=100)
    _run(tmp_path, "split", steps=3, ckpt_every=100)
    split = _run(tmp_path, "split", steps=6, ckpt_every=100, resume=True)
    for name in ("model.safetensors", "resume/model.safetensors"):
        a, b = load_file(straight / "checkpoint" / name), load_file(split / "checkpoint" / name)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    steps = [json.loads(line)["step"] for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 3, 4, 6]  # logs every 2 steps and at the end of each run; nothing repeated


def test_refuses_to_overwrite_or_resume_nothing(tmp_path):
    _run(tmp_path, steps=1)
    with pytest.raises(FileExistsError, match="--resume"):
        _run(tmp_path, steps=1)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        _run(tmp_path, "other", steps=1, resume=True)
    with pytest.raises(ValueError, match="holds .*hidden_size.: 32.*but this run builds .*hidden_size.: 64"):
        _run(tmp_path, steps=2, resume=True, model_args={"hidden_size": 64, "depth": 1, "num_heads": 2, "patch_size": 8})


def _folder(root, classes=("a", "b", "c"), per_class=3):
    for i, name in enumerate(classes):
        for j in range(per_class):
            (root / name).mkdir(parents=True, exist_ok=True)
            mode, size = [("RGB", (20, 30)), ("L", (16, 16)), ("RGBA", (40, 40))][j % 3]
            Image.new(mode, size, tuple([60 * i + 10 * j] * len(mode)) if len(mode) > 1 else 60 * i).save(root / name / f"{j}.png")
    (root / "a" / "readme.txt").write_text("skip me")
    return root


def test_image_folder_in_pixel_space(tmp_path):
    data = _folder(tmp_path / "data")
    out = _run(tmp_path, data=str(data), image_size=16, image_channels=3, steps=2, workers=2)
    config = json.loads((out / "checkpoint" / "config.json").read_text())
    assert config["model"]["kwargs"]["num_classes"] == 3 and config["model"]["kwargs"]["in_channels"] == 3
    assert config["data"]["classes"] == ["a", "b", "c"] and config["data"]["num_items"] == 9
    assert (out / "samples.png").is_file()


def test_more_classes_than_the_model(tmp_path):
    data = _folder(tmp_path / "data")
    with pytest.raises(ValueError, match="3 classes but the model has num_classes=2"):
        _run(tmp_path, data=str(data), image_size=16, num_classes=2, steps=1)


def test_folder_with_a_diffusers_vae_and_cached_latents(tmp_path):
    from diffusers import AutoencoderKL

    vae_dir = tmp_path / "vae"
    AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4,
                  scaling_factor=0.5).save_pretrained(vae_dir)
    data = _folder(tmp_path / "data")
    out = _run(tmp_path, data=str(data), image_size=32, vae=str(vae_dir), cache_latents=True, steps=2,
               model_args={"hidden_size": 32, "depth": 1, "num_heads": 2, "patch_size": 4})
    config = json.loads((out / "checkpoint" / "config.json").read_text())
    assert config["vae"] == {"kind": "diffusers", "path": str(vae_dir.resolve()), "scaling_factor": 0.5,
                             "image_size": 32, "image_channels": 3}
    assert config["model"]["kwargs"]["input_size"] == 16 and config["model"]["kwargs"]["in_channels"] == 4
    assert not (out / "checkpoint" / "vae").exists()  # a user's VAE is referenced, not copied
    meta = json.loads((out / "latents" / "meta.json").read_text())
    assert meta["num_items"] == 9
    import numpy as np

    assert np.load(out / "latents" / "mean.npy", mmap_mode="r").shape == (9, 2, 4, 16, 16)


def test_missing_vae_dir(tmp_path):
    data = _folder(tmp_path / "data")
    with pytest.raises(FileNotFoundError, match="VAE directory"):
        _run(tmp_path, data=str(data), vae=str(tmp_path / "nope"), steps=1)


def test_bad_options():
    with pytest.raises(ValueError, match="--data needs --vae"):
        build_config(None, "some/dir")
    assert build_config(None, "some/dir", vae="none").image_size == 256
    with pytest.raises(ValueError, match="--window-radius"):
        build_config("tiny", None, attention="local")
    with pytest.raises(ValueError, match="'full' or 'local'"):
        build_config("tiny", None, attention="sparse")
    with pytest.raises(ValueError, match="valid presets: mnist, dit, tiny"):
        build_config("huge", None)


def test_local_attention_run(tmp_path):
    out = _run(tmp_path, steps=2, attention="local", window_radius=2, model_args={"hidden_size": 32, "depth": 1, "num_heads": 2, "patch_size": 4})
    config = json.loads((out / "checkpoint" / "config.json").read_text())
    assert config["attention"] == {"kind": "local", "radius": 2, "down_factor": 0}
    model, _ = checkpoint.load_model(out / "checkpoint")
    assert model.attention_config["kind"] == "local"


def test_ema_matches_its_formula():
    from train.ema import EMA

    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9, warmup=True)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=1)  # warmup decay min(0.9, 2/11)
    torch.testing.assert_close(ema.model.weight, start + (1 - 2 / 11))
    assert EMA(model, 0.9999).decay_at(1) == 0.9999 and ema.decay_at(10_000) == 0.9
    with pytest.raises(ValueError, match="EMA decay"):
        EMA(model, 1.0)


def test_bf16_auto_follows_the_device(tmp_path):
    assert build_config("dit", "data", vae="none").bf16 is None  # auto
    assert build_config("mnist", None).bf16 is False and build_config("dit", "data", vae="none", bf16=False).bf16 is False
    flags = tmp_path / "cpuinfo"
    flags.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_vnni\n")
    assert cpu_flags(flags) >= {"avx512f", "avx512_vnni"} and not native_bf16(torch.device("cpu"), flags)
    flags.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n")
    assert native_bf16(torch.device("cpu"), flags)
    assert not native_bf16(torch.device("cpu"), tmp_path / "missing") and not native_bf16(torch.device("meta"))
    config = dataclasses.replace(build_config("tiny", None, out=str(tmp_path / "auto"), steps=2), bf16=None)
    out = train(config, progress=False)
    recorded = json.loads((out / "checkpoint" / "config.json").read_text())["training"]["bf16"]
    assert recorded is native_bf16(torch.device("cpu"))  # the choice made, not "auto"


def test_bf16_autocast_and_gradient_clipping(tmp_path):
    out = _run(tmp_path, steps=2, log_every=1, bf16=True, grad_clip=1e-3)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["loss"] < 10 for r in records)
    assert records[0]["grad_norm"] > 1e-3  # reported before clipping
