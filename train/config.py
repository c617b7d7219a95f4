"""Run settings: one dataclass, filled from a preset and then from the command-line values given.

Presets
- `mnist` (the default without --data): the embedded digits in the latent space of a tiny VAE, sized to
  finish with metrics in about 12.5 minutes on 2 CPU cores, VAE included (recipe and measurements in docs/training.md).
- `dit` (the default with --data): the DiT paper recipe (AdamW 1e-4, EMA 0.9999, batch 256, 400K steps), with
  bf16 autocast where the device multiplies bf16 natively.
- `tiny`: seconds-long runs for tests and smoke checks.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

PRESET_NAMES = ("mnist", "dit", "tiny")


@dataclass
class TrainConfig:
    out: str = "runs/default"
    data: str | None = None  # None = the embedded MNIST digits
    image_size: int = 256
    image_channels: int = 3  # folder data in pixel space; a VAE's in_channels wins otherwise
    vae: str | None = None  # diffusers AutoencoderKL dir, or "none" for pixel space; must be chosen for --data
    vae_steps: int = 300  # only when the digit VAE has to be trained first
    cache_latents: bool = False
    hflip: bool = True  # DiT's only augmentation; off for digits (a mirrored 3 is not a 3)
    model: str = "dit_xl_2"
    model_args: dict = field(default_factory=dict)
    num_classes: int | None = None  # None = number of classes in the data
    attention: str = "full"
    window_radius: int | None = None
    down_factor: int | None = None
    cfg_channels: int | str = 3
    lr: float = 1e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.9999
    ema_warmup: bool = False
    bf16: bool | None = False  # None = auto: on where bf16 products are native (train.precision)
    grad_clip: float = 0.0
    seed: int = 0
    steps: int = 400_000
    batch_size: int = 256  # global, split across ranks
    workers: int = 4
    log_every: int = 100
    ckpt_every: int = 50_000
    sample_every: int = 10_000
    sample_steps: int = 50
    guidance_scale: float = 4.0
    eval_per_class: int = 100  # digits only: samples per class judged by the classifier; 0 = no evaluation
    eval_every: int = 0  # digits only: score 20 samples per class every N steps (accuracy-vs-time curve); 0 = off
    eval_steps: int = 50
    eval_guidance_scale: float = 4.0
    resume: bool = False

    def validate(self) -> None:
        if self.vae is None:
            raise ValueError(
                "--data needs --vae DIR (a diffusers AutoencoderKL directory, e.g. a local sd-vae-ft-ema) "
                "or --vae none to train in pixel space"
            )
        if self.attention not in ("full", "local"):
            raise ValueError(f"--attention must be 'full' or 'local', got {self.attention!r}")
        if self.attention == "local" and not self.window_radius:
            raise ValueError("--attention local needs --window-radius R (keys at token distance < R are seen)")
        if self.attention == "full" and (self.window_radius or self.down_factor):
            raise ValueError("--window-radius / --down-factor only apply with --attention local")
        if self.cfg_channels != "all" and not (isinstance(self.cfg_channels, int) and self.cfg_channels >= 1):
            raise ValueError(f"--cfg-channels must be a positive int or 'all', got {self.cfg_channels!r}")
        for name in ("steps", "batch_size", "log_every", "ckpt_every", "sample_every", "sample_steps", "eval_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")

    def to_json(self) -> dict:
        return asdict(self)


PRESETS: dict[str, dict] = {
    "mnist": dict(
        data=None, image_size=32, vae="runs/vae", vae_steps=300, cache_latents=True, hflip=False,
        model="dit_tiny_2", model_args=dict(hidden_size=256, depth=4, num_heads=4, patch_size=2),
        cfg_channels="all", lr=3e-3, ema_decay=0.999, ema_warmup=True,
        steps=1250, batch_size=64, workers=0, log_every=50, ckpt_every=250, sample_every=625,
        sample_steps=25, guidance_scale=3.0, eval_per_class=100, eval_steps=25, eval_guidance_scale=3.0,
    ),
    # DiT-S/2 at batch 8 on an AVX512-BF16 CPU: 0.98 s per step with bf16 autocast, 2.07 s in fp32. The mnist
    # preset stays fp32: its small products gain nothing (65 vs 69 ms per step).
    "dit": dict(bf16=None),
    "tiny": dict(
        data=None, image_size=32, vae="none", vae_steps=4, cache_latents=True, hflip=False,
        model="dit_tiny_2", model_args=dict(hidden_size=32, depth=1, num_heads=2, patch_size=8),
        cfg_channels="all", lr=1e-3, ema_decay=0.9, ema_warmup=True,
        steps=6, batch_size=8, workers=0, log_every=2, ckpt_every=3, sample_every=6,
        sample_steps=4, guidance_scale=2.0, eval_per_class=0, eval_steps=4, eval_guidance_scale=2.0,
    ),
}


def build_config(preset: str | None, data: str | None, **given) -> TrainConfig:
    """Preset values, then every explicitly given option. preset None = 'mnist' without --data, else 'dit'."""
    name = preset or ("mnist" if data is None else "dit")
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESET_NAMES)}")
    values = {**PRESETS[name], **({"data": data} if data is not None else {})}
    valid = {f.name for f in fields(TrainConfig)}
    unknown = set(given) - valid
    if unknown:
        raise TypeError(f"unknown settings {sorted(unknown)}")
    values.update({k: v for k, v in given.items() if v is not None})
    config = TrainConfig(**values)
    config.validate()
    return config


def load_run_config(out: str | Path) -> dict:
    """The settings a run recorded (for --resume checks)."""
    return json.loads((Path(out) / "checkpoint" / "config.json").read_text())["training"]
