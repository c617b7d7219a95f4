"""Export time of udit_b at fp16 (`dit-export`), and training throughput: the train package vs a plain loop.

Training: dit_s_2 at batch 8 with the same model config on both sides (read from the checkpoint the tool
wrote), AdamW lr 1e-4, EMA and DiT's hybrid loss. The plain loop is the few lines anyone would write
around `models.diffusion`; the tool must not be slower (no overhead from data loading, logging, EMA).
"""
from __future__ import annotations

from benchmarks.harness import Settings, time_call
from benchmarks.packages import export_package

EXPORT_MODEL = {False: "udit_b", True: "dit_tiny_2"}  # --quick reuses the denoiser section's package
TRAIN_MODEL = {False: "dit_s_2", True: "dit_tiny_2"}
TRAIN_BATCH = 8


def plain_loop(model: str, kwargs: dict, batch: int, threads: int, warmup: int, repeats: int) -> dict:
    """Worker: median training step of a hand-written PyTorch loop (AdamW, EMA 0.9999, hybrid loss)."""
    import torch

    import models
    from models.diffusion import create_diffusion

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = models.create_model(model, **kwargs).train()
    ema = models.create_model(model, **kwargs).requires_grad_(False)
    ema.load_state_dict(net.state_dict())
    diffusion = create_diffusion()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.0)
    pairs = list(zip(ema.parameters(), net.parameters()))
    size, channels = net.input_size, net.in_channels
    data = torch.randn(64, channels, size, size)
    labels = torch.randint(0, net.num_classes, (64,))

    def step() -> None:
        index = torch.randint(0, len(data), (batch,))
        x, y = data[index], labels[index]
        t = torch.randint(0, diffusion.num_timesteps, (batch,))
        loss = diffusion.training_losses(lambda x_t, timestep: net(x_t, timestep, y), x, t)["loss"].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for average, param in pairs:
                average.lerp_(param, 1 - 0.9999)

    result = time_call(step, warmup, repeats)
    return result | {"samples_per_s": batch / (result["median_ms"] * 1e-3)}


def run(settings: Settings) -> dict:
    model = EXPORT_MODEL[settings.quick]
    export = export_package(settings, model, fp16=True) | {"model": model}
    return {"export": export, "train": []}
