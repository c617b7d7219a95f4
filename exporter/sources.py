"""Where the exported model comes from: our checkpoint dir, an official DiT / U-DiT file, a diffusers dir, or random.

Every loader returns a `Source`: the fused (re-parameterised), eval-mode float32 denoiser with the
`model(x, t, y)` signature plus everything the manifest must say about it (latent shape, classes,
schedule, CFG channel rule, VAE). Diffusers models keep diffusers' semantics: CFG on all latent
channels and the pipeline's own scheduler config.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import models
from models.linearize import ATTENTION_LAYERS, LocalWindow
from models.official import CheckpointMismatchError, check_state_dict
from models.udit import DownsampledAttention
from exporter.vae import load_vae

CHECKPOINT_FORMAT = "dit-edge-checkpoint"
DEFAULT_DIFFUSION = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
                     "prediction_type": "epsilon"}


@dataclass
class Source:
    """A float32 eval-mode denoiser `model(x, t, y)` and the facts the package manifest records about it."""

    model: nn.Module
    name: str
    config: dict
    family: str
    attention: dict
    latent: tuple[int, int, int]
    num_classes: int
    learn_sigma: bool
    origin: dict
    cfg_channels: int | str = 3
    diffusion: dict = field(default_factory=lambda: dict(DEFAULT_DIFFUSION))
    vae: nn.Module | None = None
    scaling_factor: float | None = None
    pixel_space: bool = False
    scheduler: dict | None = None


def expected_custom_nodes(model: nn.Module) -> dict[str, int]:
    """How many dit_ops nodes the export must contain: one per CLEAR window / U-DiT downsampled attention."""
    counts = {"DownsampledAttention": 0, "LocalWindowAttention": 0}
    for module in model.modules():
        if isinstance(module, ATTENTION_LAYERS):
            if isinstance(getattr(module, "window", None), LocalWindow):
                counts["LocalWindowAttention"] += 1
            elif isinstance(module, DownsampledAttention):
                counts["DownsampledAttention"] += 1
    return counts


def _perturb_zero_init(model: nn.Module, seed: int) -> None:
    """DiT / U-DiT zero-init their adaLN gates and output layer, so a fresh model outputs exactly 0;
    give those tensors small noise so a random-weight export computes something checkable."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.numel() and not param.any():
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))


def _apply_attention(model: nn.Module, attention: str | None, radius: int | None,
                     down_factor: int | None) -> nn.Module:
    """Honour --attention: local linearizes a full-attention model; asking for full on a local one is an error."""
    current = model.attention_config
    if attention is None:
        return model
    if attention not in ("full", "local"):
        raise ValueError(f"unknown --attention {attention!r}; valid choices: full, local")
    if attention == "full":
        if current.get("kind") == "local":
            raise ValueError("the source uses local (CLEAR) attention; it cannot be exported as full attention")
        return model
    if current.get("kind") == "local":
        if radius is not None and radius != current.get("radius"):
            raise ValueError(f"the source already uses local attention with radius {current.get('radius')}; "
                             f"got --window-radius {radius}")
        return model
    if radius is None:
        raise ValueError("--attention local needs --window-radius R (keys at distance < R tokens are seen)")
    return models.linearize(model, radius, down_factor or None)


def _finish(model: nn.Module) -> nn.Module:
    return models.reparameterize(model).float().eval()


def from_model(model: nn.Module, origin: dict | None = None, **facts) -> Source:
    """Source for an in-memory dit-edge model (already fused if wanted); used by the loaders and tests."""
    return Source(
        model=model, name=model.name, config=dict(model.config), family=model.family,
        attention=dict(model.attention_config),
        latent=(model.in_channels, model.input_size, model.input_size),
        num_classes=model.num_classes, learn_sigma=model.out_channels == 2 * model.in_channels,
        origin=origin or {"kind": "in-memory"}, **facts,
    )


def from_random(name: str, latent_size: int | None = None, attention: str | None = None,
                radius: int | None = None, down_factor: int | None = None, seed: int = 0,
                overrides: dict | None = None) -> Source:
    """Model `name` (constructor `overrides` allowed) with seeded random weights, and a warning saying so."""
    torch.manual_seed(seed)
    overrides = dict(overrides or {}, **({} if latent_size is None else {"input_size": latent_size}))
    model = models.create_model(name, **overrides)
    warnings.warn(
        f"no --checkpoint given: exporting {name} with RANDOM weights (seed {seed}); the package runs but "
        "generates noise", stacklevel=2,
    )
    _perturb_zero_init(model, seed)
    model = _apply_attention(model, attention, radius, down_factor)
    return from_model(_finish(model), {"kind": "random", "seed": seed})


def _read_checkpoint_config(ckpt: Path) -> dict:
    config_path = ckpt / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{ckpt} is not a checkpoint directory: no config.json")
    config = json.loads(config_path.read_text())
    if config.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{config_path}: format {config.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    if config.get("version") != 1:
        raise ValueError(f"{config_path}: checkpoint version {config.get('version')!r}, this exporter reads 1")
    return config


def _build_checkpoint_model(name: str, kwargs: dict, attention: dict) -> nn.Module:
    model = models.create_model(name, **kwargs)
    if attention.get("kind", "full") == "local":
        model = models.linearize(model, attention["radius"], attention.get("down_factor") or None)
    return model


def from_checkpoint(path: str | Path, model_name: str | None = None, latent_size: int | None = None,
                    attention: str | None = None, radius: int | None = None,
                    down_factor: int | None = None) -> Source:
    """A checkpoint directory written by `python -m train` (config.json + model.safetensors EMA weights)."""
    from safetensors.torch import load_file

    ckpt = Path(path)
    config = _read_checkpoint_config(ckpt)
    name = config["model"]["name"]
    kwargs = dict(config["model"].get("kwargs", {}))
    ckpt_attention = config.get("attention") or {"kind": "full"}
    weights = ckpt / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{ckpt} has no model.safetensors (EMA weights)")
    state = load_file(str(weights))
    if model_name is not None and models.registry.canonical_name(model_name) != name:
        other = _build_checkpoint_model(model_name, {}, ckpt_attention)
        check_state_dict(other, state, f"checkpoint {ckpt} (trained as {name}) for --model {model_name}")
        raise CheckpointMismatchError(
            f"checkpoint {ckpt} holds {name} (config.json) but --model {model_name} was given")
    model = _build_checkpoint_model(name, kwargs, ckpt_attention)
    check_state_dict(model, state, f"checkpoint {ckpt} for {name}")
    model.load_state_dict(state, strict=True)
    if latent_size is not None and latent_size != model.input_size:
        if model.family == "dit":
            raise ValueError(f"{name} was trained at latent size {model.input_size}; DiT's position table is "
                             f"fixed, so --latent-size {latent_size} needs a model trained at that size")
        resized = _build_checkpoint_model(name, {**kwargs, "input_size": latent_size}, ckpt_attention)
        resized.load_state_dict(model.state_dict(), strict=True)
        model = resized
    model = _apply_attention(model, attention, radius, down_factor)

    vae_cfg = config.get("vae") or {"kind": "none"}
    facts: dict = {"cfg_channels": config.get("cfg_channels", 3)}
    diffusion = config.get("diffusion") or {}
    facts["diffusion"] = {**DEFAULT_DIFFUSION, **{k: v for k, v in diffusion.items() if k in DEFAULT_DIFFUSION}}
    if diffusion.get("num_timesteps"):
        facts["diffusion"]["num_train_timesteps"] = diffusion["num_timesteps"]
    if vae_cfg.get("kind") == "diffusers":
        vae_path = Path(vae_cfg.get("path", "vae"))
        vae = load_vae(vae_path if vae_path.is_absolute() else ckpt / vae_path)
        facts.update(vae=vae, scaling_factor=float(vae_cfg.get("scaling_factor", vae.config.scaling_factor)))
    elif vae_cfg.get("kind", "none") == "none":
        facts.update(pixel_space=True)
    else:
        raise ValueError(f"{ckpt}/config.json: unknown vae kind {vae_cfg.get('kind')!r}; valid kinds: diffusers, none")
    return from_model(_finish(model), {"kind": "checkpoint", "path": str(ckpt.resolve())}, **facts)


def from_official(path: str | Path, name: str, latent_size: int | None = None, attention: str | None = None,
                  radius: int | None = None, down_factor: int | None = None) -> Source:
    """A checkpoint of facebookresearch/DiT or YuchuanTian/U-DiT (bare state_dict or {"ema"/"model": ...})."""
    overrides = {} if latent_size is None else {"input_size": latent_size}
    model = models.load_official(name, path, **overrides)
    model = _apply_attention(model, attention, radius, down_factor)
    return from_model(_finish(model), {"kind": "official", "path": str(Path(path).resolve())}, cfg_channels=3)


class DiffusersDenoiser(nn.Module):
    """DiTTransformer2DModel behind our `model(x, t, y)` signature (t float timesteps, y int64 labels)."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.transformer(x, timestep=t, class_labels=y, return_dict=False)[0]


def from_diffusers(path: str | Path, attention: str | None = None) -> Source:
    """A DiTPipeline directory (transformer/, vae/, scheduler/) or a bare DiTTransformer2DModel directory."""
    from diffusers import DiTTransformer2DModel

    root = Path(path)
    pipeline = (root / "transformer" / "config.json").is_file()
    model_dir = root / "transformer" if pipeline else root
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{root} is neither a diffusers DiTPipeline directory (transformer/, vae/, scheduler/) nor a "
            "DiTTransformer2DModel directory (config.json + weights)")
    if attention == "local":
        raise ValueError("--attention local is available for dit-edge models only, not for diffusers sources")
    transformer = DiTTransformer2DModel.from_pretrained(model_dir, low_cpu_mem_usage=False).float().eval()
    cfg = transformer.config
    out_channels = cfg.out_channels or cfg.in_channels
    facts: dict = {"cfg_channels": "all"}
    scheduler_path = root / "scheduler" / "scheduler_config.json"
    if pipeline and scheduler_path.is_file():
        scheduler = json.loads(scheduler_path.read_text())
        facts["scheduler"] = scheduler
        facts["diffusion"] = {**DEFAULT_DIFFUSION, **{k: v for k, v in scheduler.items() if k in DEFAULT_DIFFUSION}}
    if pipeline and (root / "vae" / "config.json").is_file():
        vae = load_vae(root / "vae")
        facts.update(vae=vae, scaling_factor=float(vae.config.scaling_factor))
    return Source(
        model=DiffusersDenoiser(transformer).eval(), name="diffusers_dit", family="dit",
        config={k: v for k, v in cfg.items() if not k.startswith("_")},
        attention={"kind": "full"}, latent=(cfg.in_channels, cfg.sample_size, cfg.sample_size),
        num_classes=cfg.num_embeds_ada_norm, learn_sigma=out_channels == 2 * cfg.in_channels,
        origin={"kind": "diffusers", "path": str(root.resolve()), "class": "DiTTransformer2DModel"}, **facts,
    )


def load_source(model: str | None = None, checkpoint: str | Path | None = None, official: str | Path | None = None,
                diffusers: str | Path | None = None, latent_size: int | None = None, attention: str | None = None,
                radius: int | None = None, down_factor: int | None = None, seed: int = 0) -> Source:
    """Dispatch on which of --checkpoint / --official / --diffusers was given (at most one)."""
    given = [flag for flag, value in (("--checkpoint", checkpoint), ("--official", official),
                                      ("--diffusers", diffusers)) if value is not None]
    if len(given) > 1:
        raise ValueError(f"give at most one of --checkpoint, --official, --diffusers (got {', '.join(given)})")
    if model is not None:
        models.registry.canonical_name(model)  # unknown names fail here, listing the valid ones
    attention_args = dict(attention=attention, radius=radius, down_factor=down_factor)
    if checkpoint is not None:
        return from_checkpoint(checkpoint, model, latent_size, **attention_args)
    if official is not None:
        if model is None:
            raise ValueError(f"--official needs --model NAME; valid names: {', '.join(models.MODEL_NAMES)}")
        return from_official(official, model, latent_size, **attention_args)
    if diffusers is not None:
        if latent_size is not None:
            raise ValueError("--latent-size does not apply to --diffusers (the transformer's sample_size is used)")
        return from_diffusers(diffusers, attention)
    if model is None:
        raise ValueError(f"give --model NAME (valid names: {', '.join(models.MODEL_NAMES)}) or --checkpoint DIR")
    return from_random(model, latent_size, **attention_args, seed=seed)
