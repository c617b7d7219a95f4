"""CLEAR distillation on a tiny teacher: what trains, what it writes, and that the matching losses fall."""

import json

import pytest
import torch
from safetensors.torch import load_file

from train import checkpoint
from train.config import build_config
from train.distill import DistillConfig, distill
from train.loop import train


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "run"
    model_args = {"hidden_size": 32, "depth": 2, "num_heads": 2, "patch_size": 4}  # 8x8 token grid
    train(build_config("tiny", None, out=str(out), steps=20, lr=3e-3, model_args=model_args), progress=False)
    return out / "checkpoint"


def test_distill_trains_only_attention_and_writes_a_local_checkpoint(teacher, tmp_path):
    config = DistillConfig(teacher=str(teacher), radius=2, down_factor=2, out=str(tmp_path / "d"), num_samples=32,
                           teacher_steps=4, steps=30, batch_size=16, lr=3e-3, eval_per_class=1,
                           denoise_weight=0.0)  # the near-untrained teacher's data would dominate L_denoise
    report = distill(config, progress=False)
    assert set(report) >= {"zero_shot", "distilled", "improved", "trainable_parameters"}
    assert report["zero_shot"]["psnr_db"] > 0 and report["distilled"]["psnr_db"] > 0

    saved = json.loads((tmp_path / "d" / "checkpoint" / "config.json").read_text())
    assert saved["attention"] == {"kind": "local", "radius": 2, "down_factor": 2}
    assert saved["model"] == json.loads((teacher / "config.json").read_text())["model"]
    student, _ = checkpoint.load_model(tmp_path / "d" / "checkpoint")
    assert student.attention_config["kind"] == "local"

    teacher_weights = load_file(teacher / "model.safetensors")
    student_weights = load_file(tmp_path / "d" / "checkpoint" / "model.safetensors")
    changed = {k for k in teacher_weights if not torch.equal(teacher_weights[k], student_weights[k])}
    assert changed and all(".attn.qkv." in k or ".attn.proj." in k for k in changed), changed
    pools = [k for k in student_weights if k.endswith("pool_weight")]
    assert len(pools) == 2 and any(not torch.allclose(student_weights[k], torch.full((4,), 0.25)) for k in pools)
    assert report["trainable_parameters"] == 2 * (32 * 96 + 96 + 32 * 32 + 32 + 4)

    for term in ("eps_mse", "attn_mse"):  # measured on the same fixed noisy batch before and after
        assert report["distilled"][term] < report["zero_shot"][term], term
    assert len((tmp_path / "d" / "metrics.jsonl").read_text().splitlines()) == 30


def test_distill_rejects_a_local_teacher(teacher, tmp_path):
    config = DistillConfig(teacher=str(teacher), radius=2, out=str(tmp_path / "d1"), num_samples=8, teacher_steps=2,
                           steps=1, batch_size=4, eval_per_class=1)
    distill(config, progress=False)
    with pytest.raises(ValueError, match="already uses"):
        distill(DistillConfig(teacher=str(tmp_path / "d1" / "checkpoint"), radius=2, out=str(tmp_path / "d2")), progress=False)
    with pytest.raises(ValueError, match="down_factor=3 must divide"):
        distill(DistillConfig(teacher=str(teacher), radius=2, down_factor=3, out=str(tmp_path / "d3")), progress=False)
