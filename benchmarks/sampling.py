"""End to end: 20 steps of dpm++2m with CFG, `runtime.Sampler` against diffusers' DiTPipeline in torch.

Both sample the same weights: a DiTPipeline directory (DiT-S/2 transformer, SD-VAE-sized AutoencoderKL
for 256 px, DPMSolverMultistepScheduler; random weights, speed does not depend on them) is written once,
and `dit-export --diffusers` turns it into the runtime's package. Each side runs in its own process, so
its peak RSS covers everything it imports and loads. `import runtime` is timed in fresh interpreters.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from benchmarks.harness import Settings, ok, run_process, run_worker, time_call
from benchmarks.packages import calibrate_int8, dit_export_command, read_manifest

STEPS = {False: 20, True: 5}  # by --quick
GUIDANCE = 4.0
LABELS = [207]  # one image: its CFG pair is the batch-2 step of the denoiser table
# The edge configuration, one model resident at a time; the sampling targets are measured on it.
LOW_MEMORY_ROW = "runtime.Sampler(low_memory=True) (onnxruntime)"
IMPORT_PROBE = ("import json, sys, time; start = time.perf_counter(); import runtime; "
                "elapsed = time.perf_counter() - start; "
                "print(json.dumps({'import_s': elapsed, 'torch_loaded': 'torch' in sys.modules, "
                "'diffusers_loaded': 'diffusers' in sys.modules}))")


def build_pipeline(out_dir: str, quick: bool) -> dict:
    """Worker: write a random-weight DiTPipeline directory (DiT-S/2 + SD-VAE layout at 256 px; tiny in quick)."""
    import torch
    from diffusers import AutoencoderKL, DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler

    torch.manual_seed(0)
    if quick:
        transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8,
                                            num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
        blocks, layers, image = (32, 32), 1, 16
    else:
        transformer = DiTTransformer2DModel(num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=8,
                                            num_layers=12, sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
        blocks, layers, image = (128, 256, 512, 512), 2, 256
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=blocks, layers_per_block=layers,
        down_block_types=("DownEncoderBlock2D",) * len(blocks), up_block_types=("UpDecoderBlock2D",) * len(blocks),
        sample_size=image, scaling_factor=0.18215,
    )
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                            beta_schedule="linear")
    DiTPipeline(transformer=transformer.eval(), vae=vae.eval(), scheduler=scheduler).save_pretrained(out_dir)
    return {"image_size": image, "transformer_params": sum(p.numel() for p in transformer.parameters()),
            "vae_params": sum(p.numel() for p in vae.parameters())}


def sample_runtime(package: str, labels: list[int], steps: int, guidance_scale: float, threads: int,
                   repeats: int, precision: str = "fp32", low_memory: bool = False) -> dict:
    """Worker (torch-free): load the package, sample once (first call), then time `repeats` more calls."""
    start = time.perf_counter()
    import runtime

    imported = time.perf_counter()
    sampler = runtime.Sampler(package, provider="cpu", threads=threads, precision=precision, low_memory=low_memory)
    loaded = time.perf_counter()

    def sample():
        return sampler(labels, steps=steps, guidance_scale=guidance_scale, scheduler="dpm++2m", seed=0)

    image = sample()
    first = time.perf_counter()
    result = time_call(sample, 0, repeats)
    result.update(import_s=imported - start, load_s=loaded - imported, first_sample_s=first - loaded,
                  cold_s=first - start, image_shape=list(image.shape), torch_loaded="torch" in sys.modules)
    return result


def sample_diffusers(pipeline_dir: str, labels: list[int], steps: int, guidance_scale: float, threads: int,
                     repeats: int) -> dict:
    """Worker: DiTPipeline in torch, same protocol as sample_runtime."""
    start = time.perf_counter()
    import torch
    from diffusers import DiTPipeline

    torch.set_num_threads(threads)
    imported = time.perf_counter()
    pipe = DiTPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    loaded = time.perf_counter()

    def sample():
        generator = torch.Generator().manual_seed(0)
        return pipe(labels, guidance_scale=guidance_scale, generator=generator, num_inference_steps=steps,
                    output_type="np").images

    image = sample()
    first = time.perf_counter()
    result = time_call(sample, 0, repeats)
    result.update(import_s=imported - start, load_s=loaded - imported, first_sample_s=first - loaded,
                  cold_s=first - start, image_shape=list(image.shape))
    return result


def import_runtime_time(settings: Settings) -> dict:
    """Median `import runtime` time over fresh interpreters, and whether torch/diffusers got imported."""
    probes = []
    for index in range(max(2, settings.repeats)):
        label = f"import_runtime_{index}"
        process = run_process([sys.executable, "-c", IMPORT_PROBE], settings, label=label, timeout=120)
        if process["status"] != "ok":
            return {"status": f"unavailable: {process['status']}"}
        probes.append(json.loads(process_output(process)))
    times = sorted(probe["import_s"] for probe in probes)
    return {"status": "ok", "median_s": times[len(times) // 2], "runs_s": times,
            "torch_loaded": any(p["torch_loaded"] for p in probes),
            "diffusers_loaded": any(p["diffusers_loaded"] for p in probes)}


def process_output(process: dict) -> str:
    """The last line a finished process printed (its log holds stdout and stderr)."""
    with open(process["log"]) as log:
        return [line for line in log.read().splitlines() if line.strip()][-1]


def _runtime_int8_row(settings: Settings, package: Path, common: dict) -> dict:
    """The same package with an int8 denoiser (calibrated for speed only); an extra row, not the target's,
    which compares the same fp32 weights."""
    label = "runtime.Sampler, int8 denoiser (onnxruntime)"
    if "int8" not in read_manifest(package)["denoiser"]["precisions"]:
        calibrated = calibrate_int8(settings, package, label="sampling_calibrate")
        if not ok(calibrated):
            return {"status": calibrated["status"], "implementation": label}
    return run_worker(settings, "benchmarks.sampling:sample_runtime",
                      {"package": str(package), **common, "precision": "int8"}, label="sampling_runtime_int8") | {
        "implementation": label}


def run(settings: Settings) -> dict:
    pipeline_dir = settings.workdir / ("pipeline_quick" if settings.quick else "pipeline_dit_s_2")
    package = settings.workdir / "packages" / (pipeline_dir.name + "_runtime")
    record = pipeline_dir / "benchmark_build.json"  # a reused pipeline keeps what its build reported
    if (pipeline_dir / "model_index.json").exists() and record.exists():
        built = json.loads(record.read_text())
    else:
        built = run_worker(settings, "benchmarks.sampling:build_pipeline",
                           {"out_dir": str(pipeline_dir), "quick": settings.quick}, label="sampling_build_pipeline")
        if ok(built):
            record.write_text(json.dumps(built))
    steps = STEPS[settings.quick]
    common = {"labels": LABELS, "steps": steps, "guidance_scale": GUIDANCE, "threads": settings.threads,
              "repeats": settings.repeats}
    rows = []
    exported: dict = {"status": "unavailable: no pipeline"}
    if ok(built):
        exported = {"status": "ok"}
        if not (package / "manifest.json").exists():
            command = dit_export_command()
            exported = run_process([*command, "--diffusers", str(pipeline_dir), "--out", str(package), "--force"],
                                   settings, label="sampling_export") if command else {
                "status": "the dit-export console script is not installed"}
            if exported["status"] != "ok":
                exported["status"] = f"unavailable: dit-export --diffusers {exported['status']}"
        rows.append(run_worker(settings, "benchmarks.sampling:sample_diffusers",
                               {"pipeline_dir": str(pipeline_dir), **common}, label="sampling_diffusers")
                    | {"implementation": "diffusers DiTPipeline (torch)"})
    else:
        rows.append({"status": built["status"], "implementation": "diffusers DiTPipeline (torch)"})
    if ok(exported):
        rows.append(run_worker(settings, "benchmarks.sampling:sample_runtime", {"package": str(package), **common},
                               label="sampling_runtime") | {"implementation": "runtime.Sampler (onnxruntime)"})
        rows.append(run_worker(settings, "benchmarks.sampling:sample_runtime",
                               {"package": str(package), **common, "low_memory": True}, label="sampling_runtime_low_memory")
                    | {"implementation": LOW_MEMORY_ROW})
        rows.append(_runtime_int8_row(settings, package, common))
    else:
        rows.append({"status": exported["status"], "implementation": "runtime.Sampler (onnxruntime)"})
    for row in rows:
        if ok(row):
            row["peak_rss_mb"] = row["process"]["peak_rss_mb"]
    return {"steps": steps, "scheduler": "dpm++2m", "guidance_scale": GUIDANCE, "labels": LABELS,
            "pipeline": built, "export": exported, "rows": rows,
            "import_runtime": import_runtime_time(settings)}
