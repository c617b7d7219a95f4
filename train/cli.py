"""`python -m train` (train; default run = the MNIST preset), `python -m train vae`, `python -m train distill`.

Options left unset take their value from the preset (see train/config.py and docs/training.md), so that
`python -m train` alone runs the measured default and `--data DIR` alone runs DiT's recipe.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts show defaults in [brackets], not markup
    help="Train DiT / U-DiT / CLEAR models. Without a command: train (the default run needs no options).",
)

from .checkpoint import CheckpointError

# Errors that describe bad input or a bad environment: shown as one line, exit status 1.
USER_ERRORS = (ValueError, TypeError, OSError, CheckpointError)


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _fail(error: Exception) -> None:
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(1)


def _model_args(pairs: list[str] | None) -> dict | None:
    """KEY=VALUE pairs; values parse as JSON (numbers, true/false, lists) or stay strings."""
    if not pairs:
        return None
    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--model-arg takes KEY=VALUE, got {pair!r}")
        try:
            parsed[key] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key] = value
    return parsed


def _cfg_channels(value: str | None) -> int | str | None:
    if value is None or value == "all":
        return value
    if not value.isdigit():
        raise typer.BadParameter(f"--cfg-channels must be a positive int or 'all', got {value!r}")
    return int(value)


@app.callback(invoke_without_command=True)
def train_command(
    ctx: typer.Context,
    preset: Annotated[Optional[str], typer.Option(help="mnist (default without --data), dit (default with --data), tiny (tests)")] = None,
    data: Annotated[Optional[str], typer.Option(help="ImageFolder DIR (class subfolders of jpg/png); default: the embedded MNIST digits")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Centre crop + resize to this side [mnist: 32; dit: 256]")] = None,
    image_channels: Annotated[Optional[int], typer.Option(help="1 or 3; pixel-space folder data only (a VAE fixes it) [3]")] = None,
    vae: Annotated[Optional[str], typer.Option(help="diffusers AutoencoderKL DIR or 'none' (pixel space); required with --data [mnist: runs/vae, trained if missing]")] = None,
    vae_steps: Annotated[Optional[int], typer.Option(help="Steps for the digit VAE when it has to be trained first [300]")] = None,
    cache_latents: Annotated[Optional[bool], typer.Option("--cache-latents/--no-cache-latents", help="Pre-extract VAE latents once [mnist: on]")] = None,
    hflip: Annotated[Optional[bool], typer.Option("--hflip/--no-hflip", help="Random horizontal flips [dit: on; mnist: off]")] = None,
    model: Annotated[Optional[str], typer.Option(help="Model name (models.MODEL_NAMES) [mnist: dit_tiny_2; dit: dit_xl_2]")] = None,
    model_arg: Annotated[Optional[list[str]], typer.Option(help="Constructor override KEY=VALUE, repeatable (e.g. depth=6)")] = None,
    num_classes: Annotated[Optional[int], typer.Option(help="Model classes [number of classes in the data]")] = None,
    attention: Annotated[Optional[str], typer.Option(help="full or local (CLEAR window) [full]")] = None,
    window_radius: Annotated[Optional[int], typer.Option(help="CLEAR disc radius in tokens (with --attention local)")] = None,
    down_factor: Annotated[Optional[int], typer.Option(help="CLEAR pooled key/value factor d (with --attention local)")] = None,
    cfg_channels: Annotated[Optional[str], typer.Option(help="Guided output channels: an int or 'all' [mnist: all; dit: 3]")] = None,
    lr: Annotated[Optional[float], typer.Option(help="AdamW learning rate [dit: 1e-4; mnist: 3e-3]")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="AdamW weight decay [0]")] = None,
    ema_decay: Annotated[Optional[float], typer.Option(help="EMA decay [dit: 0.9999; mnist: 0.999]")] = None,
    ema_warmup: Annotated[Optional[bool], typer.Option("--ema-warmup/--no-ema-warmup", help="decay min(d, (1+n)/(10+n)) [mnist: on]")] = None,
    bf16: Annotated[Optional[bool], typer.Option("--bf16/--no-bf16", help="bfloat16 autocast for the model forward [dit: on where bf16 is native (AVX512-BF16/AMX CPUs, sm80+ GPUs); mnist: off]")] = None,
    grad_clip: Annotated[Optional[float], typer.Option(help="Clip the gradient norm; 0 = off [0]")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Global seed [0]")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps [dit: 400000; mnist: see docs/training.md]")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Global batch size, split over ranks [dit: 256]")] = None,
    workers: Annotated[Optional[int], typer.Option(help="DataLoader workers for folder data [4]")] = None,
    log_every: Annotated[Optional[int], typer.Option(help="Steps between metrics.jsonl lines [100]")] = None,
    ckpt_every: Annotated[Optional[int], typer.Option(help="Steps between checkpoints [50000]")] = None,
    sample_every: Annotated[Optional[int], typer.Option(help="Steps between sample grids [10000]")] = None,
    sample_steps: Annotated[Optional[int], typer.Option(help="DDPM steps for sample grids [50]")] = None,
    guidance_scale: Annotated[Optional[float], typer.Option(help="CFG scale for sample grids [4.0]")] = None,
    eval_per_class: Annotated[Optional[int], typer.Option(help="Digits: samples per class judged at the end; 0 = skip [100]")] = None,
    eval_every: Annotated[Optional[int], typer.Option(help="Digits: score 20 samples per class every N steps into metrics.jsonl; 0 = off [0]")] = None,
    eval_steps: Annotated[Optional[int], typer.Option(help="Digits: DDPM steps for the judged samples")] = None,
    eval_guidance_scale: Annotated[Optional[float], typer.Option(help="Digits: CFG scale for the judged samples")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/checkpoint")] = False,
    out: Annotated[Optional[str], typer.Option(help="Run directory [runs/default]")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="tqdm progress bar")] = True,
) -> None:
    """Train a class-conditional diffusion transformer (default: the MNIST preset, about 12.5 minutes on 2 CPU cores from scratch)."""
    if ctx.invoked_subcommand is not None:
        return
    _setup_logging()
    from .config import build_config
    from .loop import train

    try:
        config = build_config(
            preset, data, image_size=image_size, image_channels=image_channels, vae=vae, vae_steps=vae_steps,
            cache_latents=cache_latents, hflip=hflip, model=model, model_args=_model_args(model_arg), num_classes=num_classes,
            attention=attention, window_radius=window_radius, down_factor=down_factor,
            cfg_channels=_cfg_channels(cfg_channels), lr=lr, weight_decay=weight_decay, ema_decay=ema_decay,
            ema_warmup=ema_warmup, bf16=bf16, grad_clip=grad_clip, seed=seed, steps=steps, batch_size=batch_size,
            workers=workers, log_every=log_every, ckpt_every=ckpt_every, sample_every=sample_every,
            sample_steps=sample_steps, guidance_scale=guidance_scale, eval_per_class=eval_per_class,
            eval_every=eval_every, eval_steps=eval_steps, eval_guidance_scale=eval_guidance_scale, resume=resume or None, out=out,
        )
        train(config, progress=progress)
    except USER_ERRORS as error:
        _fail(error)


@app.command("vae")
def vae_command(
    out: Annotated[str, typer.Option(help="Output AutoencoderKL directory")] = "runs/vae",
    steps: Annotated[int, typer.Option(help="Training steps")] = 300,
    batch_size: Annotated[int, typer.Option(help="Batch size")] = 64,
    lr: Annotated[float, typer.Option(help="Peak learning rate (one-cycle)")] = 2e-3,
    kl_weight: Annotated[float, typer.Option(help="Weight of the KL term (mean per latent element)")] = 1e-4,
    seed: Annotated[int, typer.Option(help="Seed")] = 0,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="tqdm progress bar")] = True,
) -> None:
    """Train the tiny AutoencoderKL (32x32x1 -> 8x8x4) on the embedded digits."""
    _setup_logging()
    from .data import DigitsDataset
    from .vae import VaeRecipe, train_vae

    try:
        images = DigitsDataset(32)[[(i, False) for i in range(5000)]]["image"]
        recipe = VaeRecipe(steps=steps, batch_size=batch_size, lr=lr, kl_weight=kl_weight, seed=seed)
        train_vae(images, Path(out), recipe, progress=progress)
        typer.echo(f"VAE written to {out}")
    except USER_ERRORS as error:
        _fail(error)


@app.command("distill")
def distill_command(
    teacher: Annotated[str, typer.Option(help="Checkpoint directory of the full-attention teacher")],
    radius: Annotated[int, typer.Option(help="CLEAR disc radius in tokens")],
    down_factor: Annotated[Optional[int], typer.Option(help="CLEAR pooled key/value factor d")] = None,
    out: Annotated[str, typer.Option(help="Run directory (checkpoint/, metrics.json)")] = "runs/distill",
    num_samples: Annotated[int, typer.Option(help="Teacher-generated training samples (CLEAR used 10K)")] = 1000,
    teacher_steps: Annotated[int, typer.Option(help="DDPM steps the teacher samples with")] = 25,
    guidance_scale: Annotated[Optional[float], typer.Option(help="CFG scale for teacher data and evaluation [the teacher's]")] = None,
    steps: Annotated[int, typer.Option(help="Distillation steps")] = 500,
    batch_size: Annotated[int, typer.Option(help="Batch size")] = 64,
    lr: Annotated[float, typer.Option(help="AdamW learning rate of the attention projections")] = 1e-4,
    layer_stride: Annotated[int, typer.Option(help="Feature-match every k-th attention layer (CLEAR: 4)")] = 1,
    eval_per_class: Annotated[int, typer.Option(help="Samples per class for the before/after agreement")] = 20,
    denoise_weight: Annotated[float, typer.Option(help="Weight of L_denoise (CLEAR: 1; 0 = pure teacher matching)")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed")] = 0,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="tqdm progress bar")] = True,
) -> None:
    """CLEAR distillation: student = linearize(teacher), trained on teacher samples (attention projections only)."""
    _setup_logging()
    from .distill import DistillConfig, distill

    try:
        config = DistillConfig(
            teacher=teacher, radius=radius, down_factor=down_factor, out=out, num_samples=num_samples,
            teacher_steps=teacher_steps, guidance_scale=guidance_scale, steps=steps, batch_size=batch_size, lr=lr,
            layer_stride=layer_stride, eval_per_class=eval_per_class, denoise_weight=denoise_weight, seed=seed,
        )
        report = distill(config, progress=progress)
        typer.echo(json.dumps(report, indent=2))
    except USER_ERRORS as error:
        _fail(error)


def main() -> None:
    app(prog_name="python -m train")
