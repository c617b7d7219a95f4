"""CLEAR distillation (Liu et al.): full-attention teacher -> local-window student on self-generated data.

student = models.linearize(teacher, radius, down_factor); the teacher samples N latents (balanced over the
classes, with CFG) that become the training set. Only the attention projections (q, k, v, out) and the
pooling weights train, with
    L = L_denoise + 0.5 * ||eps_student - eps_teacher||^2 + 0.5 * mean_layers ||attn_student - attn_teacher||^2
where attn is the raw attention output (the input of the output projection, as CLEAR matches), both models
seeing the identical noisy input, timestep and label. L_denoise is the DiT hybrid loss on the teacher data.
Agreement with the teacher (PSNR of final samples from identical noise and labels; class accuracy on the
digits; eps and attention errors on a fixed noisy batch) is measured before (zero-shot linearization) and after.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import models
from models.diffusion import create_diffusion
from models.linearize import ATTENTION_LAYERS

from . import checkpoint
from .sampling import latents_to_images, sample_latents
from .vae import load_vae

log = logging.getLogger(__name__)

TRAINABLE_PREFIXES = ("qkv.", "proj.", "to_qkv.", "to_out.", "window.pool_weight")


@dataclass
class DistillConfig:
    teacher: str
    radius: int
    down_factor: int | None = None
    out: str = "runs/distill"
    num_samples: int = 1000
    teacher_steps: int = 25
    guidance_scale: float | None = None  # None = the teacher's sampling scale
    steps: int = 500
    batch_size: int = 64
    lr: float = 1e-4
    layer_stride: int = 1
    eval_per_class: int = 20
    seed: int = 0
    null_label_prob: float = 0.1  # keep training the unconditional branch that CFG needs
    denoise_weight: float = 1.0  # CLEAR: 1; 0 = pure teacher matching


def attention_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, ATTENTION_LAYERS)]


def output_projection(layer: torch.nn.Module) -> torch.nn.Module:
    return layer.proj if hasattr(layer, "proj") else layer.to_out


def trainable_parameters(student: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Freeze everything except the attention projections and pooling weights; return those."""
    student.requires_grad_(False)
    selected = []
    for layer in attention_layers(student):
        for name, parameter in layer.named_parameters():
            if name.startswith(TRAINABLE_PREFIXES):
                parameter.requires_grad_(True)
                selected.append(parameter)
    if not selected:
        raise ValueError("the student has no attention projections to train")
    return selected


class AttentionRecorder:
    """Forward pre-hooks on the output projection of every `stride`-th attention layer: the raw attention output.

    Records only while `enabled`, so sampling with the same model does not accumulate tensors.
    """

    def __init__(self, model: torch.nn.Module, stride: int):
        self.outputs: list[torch.Tensor] = []
        self.enabled = False
        layers = attention_layers(model)[::stride]
        self.handles = [output_projection(layer).register_forward_pre_hook(self.record) for layer in layers]

    def record(self, module, inputs) -> None:
        if self.enabled:
            self.outputs.append(inputs[0])

    def take(self) -> list[torch.Tensor]:
        outputs, self.outputs = self.outputs, []
        return outputs

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean per-image PSNR (dB) of images in [-1, 1], measured on the [0, 1] scale."""
    mse = (((a - b) / 2) ** 2).flatten(1).mean(1).clamp(min=1e-10)
    return float((10 * torch.log10(1.0 / mse)).mean())


def vae_of(teacher_dir: Path, config: dict):
    entry = config["vae"]
    if entry["kind"] == "none":
        return None, 1.0
    path = Path(entry["path"])
    return load_vae(path if path.is_absolute() else teacher_dir / path)


def teacher_dataset(teacher, config: DistillConfig, teacher_config: dict, latent_shape, guidance: float, out: Path):
    """N teacher samples (latents, labels), cached in out/teacher_samples.safetensors keyed by their settings."""
    key = {"teacher": str(Path(config.teacher).resolve()), "num_samples": config.num_samples,
           "steps": config.teacher_steps, "guidance_scale": guidance, "seed": config.seed,
           "teacher_mtime": (Path(config.teacher) / "model.safetensors").stat().st_mtime}
    path = out / "teacher_samples.safetensors"
    meta = out / "teacher_samples.json"
    if path.is_file() and meta.is_file() and json.loads(meta.read_text()) == key:
        data = load_file(path)
        return data["latents"], data["labels"]
    num_classes = teacher.num_classes
    labels = torch.arange(config.num_samples) % num_classes
    latents = sample_latents(teacher, labels, latent_shape, config.teacher_steps, guidance,
                             teacher_config.get("cfg_channels", 3), seed=config.seed + 17)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"latents": latents.contiguous(), "labels": labels}, str(tmp))
    tmp.replace(path)
    meta.write_text(json.dumps(key))
    return latents, labels


def probe_batch(latents: torch.Tensor, labels: torch.Tensor, seed: int, size: int = 256):
    """A fixed (x_t, t, y) batch on which eps and attention agreement are measured before and after."""
    generator = torch.Generator().manual_seed(seed + 7)
    index = torch.randperm(len(labels), generator=generator)[:size].to(labels.device)
    t = torch.randint(0, 1000, (len(index),), generator=generator).to(labels.device)
    noise = torch.randn(latents[index].shape, generator=generator).to(latents.device)
    return create_diffusion().q_sample(latents[index], t, noise), t, labels[index]


@torch.no_grad()
def matching_errors(teacher, student, probe, hooks: tuple[AttentionRecorder, AttentionRecorder]) -> dict:
    """Mean squared eps and raw-attention differences between student and teacher on the probe batch."""
    x_t, t, y = probe
    for recorder in hooks:
        recorder.enabled = True
    eps_teacher, eps_student = teacher(x_t, t, y)[:, : x_t.shape[1]], student(x_t, t, y)[:, : x_t.shape[1]]
    attn_teacher, attn_student = hooks[0].take(), hooks[1].take()
    for recorder in hooks:
        recorder.enabled = False
    return {
        "eps_mse": (eps_student - eps_teacher).pow(2).mean().item(),
        "attn_mse": torch.stack([(s - t_).pow(2).mean() for s, t_ in zip(attn_student, attn_teacher)]).mean().item(),
    }


@torch.no_grad()
def agreement(teacher, student, vae, scaling_factor, latent_shape, config: DistillConfig, teacher_config, guidance, classifier):
    """PSNR between teacher and student samples from identical noise and labels (+ class accuracy on digits)."""
    labels = torch.arange(teacher.num_classes).repeat_interleave(config.eval_per_class)
    noise = torch.randn(len(labels), *latent_shape, generator=torch.Generator().manual_seed(config.seed + 99))
    outputs = {}
    for name, model in (("teacher", teacher), ("student", student)):
        latents = sample_latents(model, labels, latent_shape, config.teacher_steps, guidance,
                                 teacher_config.get("cfg_channels", 3), seed=config.seed + 99, noise=noise)
        outputs[name] = latents_to_images(vae, scaling_factor, latents)
    report = {"psnr_db": round(psnr(outputs["student"], outputs["teacher"]), 3)}
    if classifier is not None:
        for name, images in outputs.items():
            report[f"{name}_class_accuracy"] = round((classifier(images).argmax(1) == labels).float().mean().item(), 4)
    return report


def distill(config: DistillConfig, progress: bool = True) -> dict:
    """Run the distillation; writes out/checkpoint (attention: local) and out/metrics.json; returns the report."""
    from tqdm.auto import tqdm

    start = time.time()
    if config.steps < 1 or config.num_samples < 1 or config.layer_stride < 1:
        raise ValueError("--steps, --num-samples and --layer-stride must be >= 1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher_dir = checkpoint.recover(config.teacher)
    teacher, teacher_config = checkpoint.load_model(teacher_dir)
    if teacher_config["attention"].get("kind") != "full":
        raise ValueError(f"the teacher {teacher_dir} already uses {teacher_config['attention']} attention; distill from a full-attention checkpoint")
    teacher = teacher.to(device).eval().requires_grad_(False)
    student = models.linearize(teacher, config.radius, config.down_factor)
    vae, scaling_factor = vae_of(teacher_dir, teacher_config)
    vae = vae.to(device) if vae is not None else None
    latent_shape = (teacher.in_channels, teacher.config["input_size"], teacher.config["input_size"])
    guidance = config.guidance_scale if config.guidance_scale is not None else teacher_config.get("sampling", {}).get("guidance_scale", 4.0)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)

    classifier = None
    if teacher_config.get("data", {}).get("kind") == "mnist":
        from .classifier import load_classifier

        classifier = load_classifier()[0]
    tick = time.time()
    latents, labels = (v.to(device) for v in teacher_dataset(teacher, config, teacher_config, latent_shape, guidance, out))
    data_s = time.time() - tick
    teacher_hooks = AttentionRecorder(teacher, config.layer_stride)
    student_hooks = AttentionRecorder(student, config.layer_stride)
    hooks = (teacher_hooks, student_hooks)
    probe = probe_batch(latents, labels, config.seed)
    student.eval()  # no label dropout: the null label is drawn below, identically for both models
    before = agreement(teacher, student, vae, scaling_factor, latent_shape, config, teacher_config, guidance, classifier)
    before.update(matching_errors(teacher, student, probe, hooks))
    log.info("zero-shot linearization vs teacher: %s", before)

    parameters = trainable_parameters(student)
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.0, fused=True)  # as train/loop.py
    diffusion = create_diffusion()
    generator = torch.Generator().manual_seed(config.seed)
    null = teacher.num_classes
    history = []
    for recorder in hooks:
        recorder.enabled = True
    bar = tqdm(range(1, config.steps + 1), desc="distill", disable=not progress)
    for step in bar:
        index = torch.randint(0, len(labels), (config.batch_size,), generator=generator).to(device)
        x0 = latents[index]
        drop = (torch.rand(len(index), generator=generator) < config.null_label_prob).to(device)
        y = torch.where(drop, torch.full_like(labels[index], null), labels[index])
        t = torch.randint(0, diffusion.num_timesteps, (len(index),), generator=generator).to(device)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        with torch.no_grad():
            teacher_out = teacher(diffusion.q_sample(x0, t, noise), t, y)
        teacher_attn = teacher_hooks.take()
        outputs = {}

        def student_fn(x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            outputs["student"] = student(x_t, timesteps, y)
            return outputs["student"]

        denoise = diffusion.training_losses(student_fn, x0, t, noise)["loss"].mean()
        channels = x0.shape[1]
        eps_loss = (outputs["student"][:, :channels] - teacher_out[:, :channels]).pow(2).mean()
        student_attn = student_hooks.take()
        attn_loss = torch.stack([(s - t_).pow(2).mean() for s, t_ in zip(student_attn, teacher_attn)]).mean()
        loss = config.denoise_weight * denoise + 0.5 * eps_loss + 0.5 * attn_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        record = {"step": step, "loss": loss.item(), "denoise": denoise.item(), "eps": eps_loss.item(), "attn": attn_loss.item()}
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
    for recorder in hooks:
        recorder.enabled = False
    after = agreement(teacher, student, vae, scaling_factor, latent_shape, config, teacher_config, guidance, classifier)
    after.update(matching_errors(teacher, student, probe, hooks))
    for recorder in hooks:
        recorder.remove()
    log.info("distilled student vs teacher: %s", after)

    config_out = {**teacher_config, "attention": dict(student.attention_config),
                  "distillation": {**asdict(config), "teacher": str(Path(config.teacher).resolve())}}
    vae_copy = None
    if teacher_config["vae"]["kind"] != "none" and not Path(teacher_config["vae"]["path"]).is_absolute():
        vae_copy = teacher_dir / teacher_config["vae"]["path"]
    checkpoint.save_checkpoint(out / "checkpoint", config_out, student, vae_dir=vae_copy)
    report = {
        "zero_shot": before,
        "distilled": after,
        "improved": after["psnr_db"] > before["psnr_db"],
        "steps": config.steps,
        "final_loss": history[-1],
        "trainable_parameters": sum(p.numel() for p in parameters),
        "timings": {"teacher_data_s": round(data_s, 1), "total_s": round(time.time() - start, 1)},
    }
    with open(out / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in history)
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    if not math.isfinite(history[-1]["loss"]):
        raise ValueError(f"distillation diverged (loss {history[-1]['loss']}); lower --lr")
    return report
