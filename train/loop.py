"""The training run: data -> latents -> DiT/U-DiT with the hybrid loss -> EMA -> checkpoints, grids, metrics.

Randomness is re-seeded at every step from (seed, step, rank): noise, timesteps and label dropout are then a
function of the step alone, so `--resume` continues exactly as an uninterrupted run would (the step in
resume/state.json is the whole RNG state, for any number of ranks).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel

import models
from models.diffusion import create_diffusion

from . import checkpoint, distributed
from .config import TrainConfig
from .data import DigitsDataset, ImageFolderDataset, epoch_batches
from .ema import EMA
from .latents import build_latent_cache
from .precision import native_bf16
from .sampling import latents_to_images, sample_latents, save_grid
from .vae import VaeRecipe, load_vae, train_vae

log = logging.getLogger(__name__)


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step) * 1_009 + rank


def open_dataset(config: TrainConfig, channels: int):
    if config.data is None:
        if channels != 1 or config.image_size != 32:
            raise ValueError(f"the embedded digits are 1-channel 32x32; got channels={channels}, image size {config.image_size}")
        return DigitsDataset(config.image_size)
    return ImageFolderDataset(config.data, config.image_size, channels)


def resolve_vae(config: TrainConfig, dist: distributed.Dist, progress: bool = True):
    """(vae or None, scaling factor, directory or None, trained_here). Trains the digit VAE when it is missing."""
    if config.vae == "none":
        return None, 1.0, None, False
    path = Path(config.vae)
    trained_here = False
    if not path.exists():
        if config.data is not None:
            raise FileNotFoundError(f"VAE directory {path} does not exist (pass a diffusers AutoencoderKL dir or --vae none)")
        if dist.is_main:
            log.info("no VAE at %s: training the digit VAE first (%d steps)", path, config.vae_steps)
            images = DigitsDataset(32)[[(i, False) for i in range(5000)]]["image"]
            train_vae(images, path, VaeRecipe(steps=config.vae_steps, seed=config.seed), progress=progress)
        dist.barrier()
        trained_here = True
    vae, scaling_factor = load_vae(path)
    trained_here = trained_here or (path / "training.json").is_file()
    return vae.to(dist.device), scaling_factor, path, trained_here


def checkpoint_config(config: TrainConfig, model, vae, scaling_factor: float, vae_dir, copy_vae: bool, dataset) -> dict:
    """config.json as docs/architecture.md defines it, plus the run's training settings."""
    if vae is None:
        vae_entry = {"kind": "none", "path": None, "scaling_factor": 1.0,
                     "image_size": config.image_size, "image_channels": model.in_channels}
    else:
        vae_entry = {"kind": "diffusers", "path": "vae" if copy_vae else str(Path(vae_dir).resolve()),
                     "scaling_factor": scaling_factor, "image_size": config.image_size,
                     "image_channels": int(vae.config.in_channels)}
    return {
        "format": checkpoint.FORMAT,
        "version": checkpoint.VERSION,
        "model": {"name": model.name, "kwargs": dict(model.config)},
        "attention": dict(model.attention_config),
        "diffusion": {"num_timesteps": 1000, "beta_schedule": "linear",
                      "learn_sigma": model.out_channels == 2 * model.in_channels},
        "vae": vae_entry,
        "data": {"kind": "mnist" if config.data is None else "folder", "path": config.data,
                 "image_size": config.image_size, "classes": list(dataset.classes), "num_items": len(dataset)},
        "cfg_channels": config.cfg_channels,
        "sampling": {"steps": config.sample_steps, "guidance_scale": config.guidance_scale},
        "training": config.to_json(),
    }


def build_model(config: TrainConfig, latent_shape: tuple[int, int, int], num_classes: int):
    kwargs = {**config.model_args, "input_size": latent_shape[1], "in_channels": latent_shape[0],
              "num_classes": num_classes, "learn_sigma": True}
    model = models.create_model(config.model, **kwargs)
    if config.attention == "local":
        model = models.linearize(model, config.window_radius, config.down_factor)
    return model


class Metrics:
    """metrics.jsonl appender (rank 0)."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def train(config: TrainConfig, progress: bool = True) -> Path:
    """Run (or resume) training; returns the output directory."""
    dist = distributed.setup()
    try:
        return _train(config, dist, progress)
    finally:
        distributed.teardown(dist)


def _train(config: TrainConfig, dist: distributed.Dist, progress: bool) -> Path:
    start_time = time.time()
    if config.bf16 is None:  # auto; the run records what it chose
        config = dataclasses.replace(config, bf16=native_bf16(dist.device))
        log.info("bf16 autocast %s (auto: bf16 products are%s native on %s)", "on" if config.bf16 else "off",
                 "" if config.bf16 else " not", dist.device)
    out = Path(config.out)
    ckpt_dir = out / "checkpoint"
    checkpoint.recover(ckpt_dir)
    if ckpt_dir.exists() and not config.resume:
        raise FileExistsError(f"{ckpt_dir} already exists: pass --resume to continue that run, or choose another --out")
    if config.resume and not ckpt_dir.exists():
        raise FileNotFoundError(f"--resume: no checkpoint in {ckpt_dir}")
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    tick = time.time()
    vae, scaling_factor, vae_dir, vae_trained_here = resolve_vae(config, dist, progress)
    timings["vae_s"] = round(time.time() - tick, 1)
    channels = int(vae.config.in_channels) if vae is not None else (1 if config.data is None else config.image_channels)
    dataset = open_dataset(config, channels)
    num_classes = config.num_classes or len(dataset.classes)
    if len(dataset.classes) > num_classes:
        raise ValueError(
            f"the data has {len(dataset.classes)} classes but the model has num_classes={num_classes}; "
            "pass --num-classes with at least the number of class folders"
        )
    if vae is not None and config.cache_latents:
        tick = time.time()
        description = {"data": config.data or "mnist", "image_size": config.image_size,
                       "vae": str(Path(vae_dir).resolve()), "vae_mtime": (Path(vae_dir) / "config.json").stat().st_mtime}
        dataset = build_latent_cache(dataset, vae, out / "latents", description, dist)
        timings["latent_cache_s"] = round(time.time() - tick, 1)
    probe = dataset[[(0, False)]]
    latent_shape = tuple(probe["mean"].shape[1:]) if "mean" in probe else tuple(probe["image"].shape[1:])
    if vae is not None and "image" in probe:
        with torch.no_grad():
            latent_shape = tuple(vae.encode(probe["image"].to(dist.device)).latent_dist.mean.shape[1:])

    # GELU tails and vanishing gradients produce subnormal floats, which x86 cores compute ~100x slower:
    # on the digits a dit_s_2 step took 2.5-4.4 s instead of ~2.1 s. Flushing them to zero changes nothing else.
    torch.set_flush_denormal(True)
    torch.manual_seed(config.seed)
    model = build_model(config, latent_shape, num_classes).to(dist.device)
    # fused: one kernel over every tensor; the default per-tensor loop took 77 of a ~1,900 ms dit_s_2 step on
    # 2 cores (fused: 21 ms). Same update rule, same optimizer state keys (checkpoints resume either way).
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True)
    ema = EMA(model, config.ema_decay, config.ema_warmup)
    copy_vae = vae is not None and vae_trained_here
    run_config = checkpoint_config(config, model, vae, scaling_factor, vae_dir, copy_vae, dataset)
    step = 0
    if config.resume:
        recorded = checkpoint.read_config(ckpt_dir)
        if recorded["model"] != run_config["model"] or recorded["attention"] != run_config["attention"]:
            raise ValueError(
                f"--resume: {ckpt_dir} holds {recorded['model']} with {recorded['attention']} attention, "
                f"but this run builds {run_config['model']} with {run_config['attention']}"
            )
        step = checkpoint.load_resume(ckpt_dir, model, optimizer)["step"]
        ema.model.load_state_dict(load_file(ckpt_dir / "model.safetensors"))
        if dist.is_main:
            drop_records_after(out / "metrics.jsonl", step)
        log.info("resumed %s at step %d", ckpt_dir, step)
    net = DistributedDataParallel(model) if dist.enabled else model
    diffusion = create_diffusion()
    local_batch = config.batch_size // dist.world_size
    if local_batch * dist.world_size != config.batch_size:
        raise ValueError(f"--batch-size {config.batch_size} must be divisible by the {dist.world_size} ranks")
    batches_per_epoch = len(epoch_batches(len(dataset), local_batch, 0, config.seed, dist.rank, dist.world_size))
    metrics = Metrics(out / "metrics.jsonl")

    def save(final: bool = False) -> None:
        if not dist.is_main:
            return
        state = {"step": step, "seed": config.seed, "world_size": dist.world_size,
                 "rng": "re-seeded every step from (seed, step, rank)", "final": final}
        checkpoint.save_checkpoint(ckpt_dir, run_config, ema.model,
                                   resume={"model": model, "optimizer": optimizer, "state": state},
                                   vae_dir=vae_dir if copy_vae else None)

    def grid(path: Path) -> None:
        if not dist.is_main:
            return
        per_class = 8
        labels = torch.arange(min(num_classes, 10)).repeat_interleave(per_class)
        latents = sample_latents(ema.model, labels, latent_shape, config.sample_steps, config.guidance_scale,
                                 config.cfg_channels, seed=config.seed)
        save_grid(latents_to_images(vae, scaling_factor, latents), per_class, path)

    def to_latents(batch: dict) -> torch.Tensor:
        if "mean" in batch:
            mean, std = batch["mean"].to(dist.device), batch["std"].to(dist.device)
            return (mean + std * torch.randn_like(mean)) * scaling_factor
        images = batch["image"].to(dist.device)
        if vae is None:
            return images
        with torch.no_grad():
            return vae.encode(images).latent_dist.sample() * scaling_factor

    workers = config.workers if isinstance(dataset, ImageFolderDataset) else 0  # in-memory data needs none

    def batches_from(first_step: int):
        """Batches from `first_step` on, across epochs; decoding runs in `workers` DataLoader processes."""
        epoch, position = divmod(first_step, batches_per_epoch)
        while True:
            keys = epoch_batches(len(dataset), local_batch, epoch, config.seed, dist.rank, dist.world_size, config.hflip)
            yield from torch.utils.data.DataLoader(dataset, sampler=keys[position:], batch_size=None, num_workers=workers,
                                                   pin_memory=dist.device.type == "cuda")
            epoch, position = epoch + 1, 0

    tick = time.time()
    tick_cpu = time.process_time()
    excluded_s = excluded_cpu_s = 0.0  # time spent in --eval-every evaluations, not counted as training time
    # running sums of (loss, mse, vb) stay on the device: no host sync until a log step
    sums, window_start, window_step = torch.zeros(3, device=dist.device), time.time(), step
    from tqdm.auto import tqdm

    bar = tqdm(total=config.steps, initial=step, desc="train", disable=not (progress and dist.is_main), dynamic_ncols=True)
    model.train()
    batches = batches_from(step)
    while step < config.steps:
        batch = next(batches)
        torch.manual_seed(step_seed(config.seed, step, dist.rank))
        x = to_latents(batch)
        y = batch["label"].to(dist.device)
        t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=dist.device)

        def forward(x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            with torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=config.bf16):
                return net(x_t, timesteps, y).float()

        terms = diffusion.training_losses(forward, x, t)
        loss = terms["loss"].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        log_step = (step + 1) % config.log_every == 0 or step + 1 == config.steps
        if config.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        elif log_step:  # measured only when logged: a plain loop would not pay for it every step
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        optimizer.step()
        step += 1
        ema.update(model, step)
        sums += torch.stack([loss.detach(), terms["mse"].detach().mean(), terms["vb"].detach().mean()])
        bar.update(1)
        if log_step:
            averaged = dist.mean(torch.cat([sums / (step - window_step), grad_norm.reshape(1)])).tolist()
            elapsed = time.time() - window_start
            record = {"step": step, "loss": averaged[0], "mse": averaged[1], "vb": averaged[2],
                      "grad_norm": averaged[3], "lr": config.lr, "steps_per_s": (step - window_step) / max(elapsed, 1e-9),
                      "elapsed_s": round(time.time() - start_time, 2), "process_cpu_s": round(time.process_time(), 2)}
            if dist.is_main:
                metrics.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
            sums, window_start, window_step = torch.zeros(3, device=dist.device), time.time(), step
        if step % config.ckpt_every == 0 and step != config.steps:
            save()
        if config.eval_every and config.data is None and step % config.eval_every == 0 and dist.is_main:
            from .evaluate import progress_scores

            eval_tick, eval_cpu = time.time(), time.process_time()
            scores = progress_scores(ema.model, vae, scaling_factor, latent_shape, config, per_class=20)
            excluded_s += time.time() - eval_tick
            excluded_cpu_s += time.process_time() - eval_cpu
            metrics.write({"step": step, **scores, "train_s": round(time.time() - tick - excluded_s, 2),
                           "train_cpu_s": round(time.process_time() - tick_cpu - excluded_cpu_s, 2)})
            model.train()
        if step % config.sample_every == 0 and step != config.steps:
            grid(out / "samples" / f"step_{step:07d}.png")
            model.train()
    bar.close()
    batches.close()
    timings["train_s"] = round(time.time() - tick - excluded_s, 1)
    save(final=True)
    dist.barrier()
    if dist.is_main:
        summary = {"steps": step, "final_loss": _last_loss(out / "metrics.jsonl"), "timings": timings}
        if config.data is None and config.eval_per_class > 0:
            from .evaluate import evaluate_digits

            tick = time.time()
            summary.update(evaluate_digits(ema.model, vae, scaling_factor, latent_shape, config, out))
            timings["eval_s"] = round(time.time() - tick, 1)
        else:
            grid(out / "samples.png")
        timings["total_s"] = round(time.time() - start_time, 1)
        tmp = out / ".metrics.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(out / "metrics.json")
        log.info("done: %s", json.dumps(summary))
    return out


def drop_records_after(path: Path, step: int) -> None:
    """On resume, forget log lines written after the checkpoint (the resumed run writes them again)."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


def _last_loss(path: Path) -> float | None:
    if not path.is_file():
        return None
    losses = [record["loss"] for record in map(json.loads, path.read_text().splitlines()) if "loss" in record]
    return losses[-1] if losses else None
