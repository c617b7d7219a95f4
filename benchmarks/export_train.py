"""Export time of udit_b at fp16 (`dit-export`), and training throughput: the train package vs a plain loop.

Training: dit_s_2 at batch 8 on 32x32x1 digits (pixel space, so no VAE cost on either side) with the same
model config on both sides (read from the checkpoint the tool wrote), AdamW lr 1e-4, EMA, DiT's hybrid loss. The plain loop is the few lines anyone would write
around `models.diffusion`; the tool must not be slower (no overhead from data loading, logging, EMA).
A full run alternates them (tool, plain, tool, plain) and pools the step times of each side, so a slow
spell of this shared machine does not land on one side only (single runs of 5 steps moved 10-15%).
"""
from __future__ import annotations

import json
import shutil
import statistics
import sys

from benchmarks.harness import Settings, ok, run_process, run_worker, time_call
from benchmarks.packages import export_package

EXPORT_MODEL = {False: "udit_b", True: "dit_tiny_2"}  # --quick reuses the denoiser section's package
TRAIN_MODEL = {False: "dit_s_2", True: "dit_tiny_2"}
TRAIN_BATCH = 8
# Processes differ by ~10-15% in steady-state step time (the same loop, run twice, 2.08-2.39 s per step), so
# the two loops alternate over three rounds and their steps are pooled.
ROUNDS = {False: 3, True: 1}
# Training throughput is a steady-state rate: the train package's first 5 steps run up to 60% slow while its
# allocations settle (2.5-3.5 s, then ~2.1-2.3 s from the sixth), so both loops skip 6 steps before timing.
TRAIN_WARMUP = 6
# Shown beside the target's fp32 rows: bf16 autocast is the dit preset's default where bf16 products are native.
BF16_ROW = "train package, bf16 autocast"


def train_warmup(settings: Settings) -> int:
    return settings.warmup if settings.quick else max(settings.warmup, TRAIN_WARMUP)


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


def train_tool(settings: Settings, model: str, bf16: bool = False) -> dict:
    """`python -m train` on the embedded digits in pixel space, logging every step; per-step times from its
    metrics.jsonl (the steps after warm-up) and the model config it built, which the plain loop copies.
    bf16=False is the like-for-like fp32 row the target compares; bf16=True is the dit preset's default on
    CPUs with native bf16 products."""
    out = settings.workdir / "train_tool"
    shutil.rmtree(out, ignore_errors=True)
    warmup = train_warmup(settings)
    steps = warmup + settings.repeats
    # pixel-space digits (1 channel, so CFG on all channels); no intermediate checkpoints, grids or evaluation
    argv = [sys.executable, "-m", "train", "--preset", "dit", "--model", model, "--vae", "none", "--image-size", "32",
            "--cfg-channels", "all",
            "--batch-size", str(TRAIN_BATCH), "--steps", str(steps), "--log-every", "1", "--ckpt-every", str(steps),
            "--sample-every", str(steps), "--sample-steps", "1", "--eval-per-class", "0", "--no-progress",
            "--seed", "0", "--out", str(out), "--bf16" if bf16 else "--no-bf16"]
    process = run_process(argv, settings, label="train_tool")
    row = {"loop": BF16_ROW if bf16 else "train package", "command": "python -m train " + " ".join(argv[3:]),
           "process": {key: process[key] for key in ("wall_s", "cpu_s", "peak_rss_mb")}}
    if process["status"] != "ok":
        return row | {"status": f"unavailable: python -m train {process['status']}"}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    runs = [1e3 / record["steps_per_s"] for record in records[warmup:]]
    if not runs:
        return row | {"status": f"unavailable: metrics.jsonl has {len(records)} step records, expected {steps}"}
    median = statistics.median(runs)
    config = json.loads((out / "checkpoint" / "config.json").read_text())["model"]
    return row | {"status": "ok", "median_ms": median, "runs_ms": runs, "warmup": warmup, "repeats": len(runs),
                  "samples_per_s": TRAIN_BATCH / (median * 1e-3),
                  "model_config": config}


def pooled(rows: list[dict]) -> dict:
    """One row from several runs of the same loop: all their step times, median over the pool."""
    failed = [row for row in rows if not ok(row)]
    if failed:
        return failed[0]
    runs = [ms for row in rows for ms in row["runs_ms"]]
    median = statistics.median(runs)
    return rows[0] | {"median_ms": median, "runs_ms": runs, "repeats": len(runs), "rounds": len(rows),
                      "samples_per_s": TRAIN_BATCH / (median * 1e-3)}


def run(settings: Settings) -> dict:
    model = EXPORT_MODEL[settings.quick]
    export = export_package(settings, model, fp16=True) | {"model": model}
    train_model = TRAIN_MODEL[settings.quick]
    tools, plains = [], []
    for _ in range(ROUNDS[settings.quick]):
        tools.append(train_tool(settings, train_model))
        if not ok(tools[-1]):
            plains.append({"status": "unavailable: needs the train package's model config (its run failed)"})
            break
        config = tools[-1]["model_config"]
        plains.append(run_worker(settings, "benchmarks.export_train:plain_loop", {
            "model": config["name"], "kwargs": config["kwargs"], "batch": TRAIN_BATCH, "threads": settings.threads,
            "warmup": train_warmup(settings), "repeats": settings.repeats}, label="train_plain"))
    plain = pooled(plains) | {"loop": "plain PyTorch"}
    bf16 = train_tool(settings, train_model, bf16=True)
    return {"export": export, "train_model": train_model, "train_batch": TRAIN_BATCH,
            "train": [pooled(tools), plain, bf16]}
