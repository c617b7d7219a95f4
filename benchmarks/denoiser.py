"""Denoiser step latency at batch 2 (a CFG pair) on the 32x32 latent, per model and backend.

Backends: torch eager fp32 (the fused inference form, as exported), torch.compile (inductor; guarded by
a timeout), ONNX Runtime on the fp32 / fp16 / int8 denoisers of the `dit-export` package, and the peer:
diffusers' DiTTransformer2DModel of the same config exported with plain `torch.onnx.export` (DiT only;
diffusers has no U-DiT). Achieved GFLOP/s = 2 * MACs / step time, MACs from `models.count_macs`.

Every backend is measured in its own process (clean peak RSS, no shared thread pools). The ratio targets
between ONNX Runtime denoisers (int8 / fp32, ours / peer, U-DiT / DiT) are measured again side by side:
one process runs them in turn, a few consecutive steps each per round, so both sides of a ratio see the
same machine.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

from benchmarks.harness import Settings, Unavailable, ok, ort_session, run_worker, time_call, timed_ort_run
from benchmarks.packages import package_with, read_manifest

FULL_MODELS = ("dit_s_2", "udit_s", "dit_b_2", "udit_b")
QUICK_MODELS = ("dit_tiny_2",)  # CI budget: every dit-export costs ~15-35 s of CPU
BATCH = 2
PRECISIONS = ("fp32", "fp16", "int8")
# Steps per turn in the interleaved measurement; the first is not timed. A sampler runs one denoiser for all
# its steps, with the weights warm in cache; a turn of one step would time every model right after the others
# evicted it (AMD EPYC, dit_s_2: fp32 112 / int8 72 ms taking single-step turns, 79 / 39 ms in turns of 4).
TURN_STEPS = 4


def _torch_inputs(net, batch: int):
    import torch

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, net.in_channels, net.input_size, net.input_size, generator=generator)
    t = torch.full((batch,), 500.0)
    y = torch.tensor([1, net.num_classes] * batch)[:batch]  # conditional + null label, as a CFG pair
    return x, t, y


def torch_step(model: str, batch: int, threads: int, warmup: int, repeats: int, compile: bool = False,
               profile_path: str | None = None) -> dict:
    """Worker: median forward of the fused model in torch eager (or torch.compile) fp32, and its MACs."""
    import torch

    import models

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = models.reparameterize(models.create_model(model)).eval()
    macs = models.count_macs(net, batch=batch)
    x, t, y = _torch_inputs(net, batch)
    result: dict = {}
    with torch.inference_mode():
        forward = torch.compile(net) if compile else net
        if compile:  # the first call compiles; report it apart from the steady-state steps
            begin = time.perf_counter()
            forward(x, t, y)
            result["compile_s"] = time.perf_counter() - begin
        result.update(time_call(lambda: forward(x, t, y), warmup, repeats))
        if profile_path:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
                for _ in range(repeats):
                    forward(x, t, y)
            table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
            Path(profile_path).write_text(f"torch profiler, {repeats} forward(s) of {model}\n{table}\n")
            result["profile"] = profile_path
    result["macs"] = macs
    return result


def _feeds(inputs: list[dict], batch: int, num_classes: int) -> dict:
    """Random feeds for the denoiser inputs described by manifest-style specs (x, t, y)."""
    import numpy as np

    rng = np.random.default_rng(0)
    feeds = {}
    for spec in inputs:
        shape = [batch if dim == "batch" else dim for dim in spec["shape"]]
        if not all(isinstance(dim, int) for dim in shape):
            raise Unavailable(f"input {spec['name']} has a symbolic shape {spec['shape']} other than batch")
        dtype = np.dtype(spec["dtype"])
        if spec["name"] == "t":
            feeds["t"] = np.full(shape, 500, dtype=dtype)
        elif spec["name"] == "y":
            feeds["y"] = np.resize(np.array([1, num_classes], dtype=dtype), shape)
        else:
            feeds[spec["name"]] = rng.standard_normal(shape).astype(dtype)
    return feeds


def ort_step(onnx_path: str, inputs: list[dict], num_classes: int, batch: int, threads: int, warmup: int,
             repeats: int, profile_path: str | None = None) -> dict:
    """Worker (torch-free): median session.run of one denoiser step in ONNX Runtime's CPU provider."""
    return timed_ort_run(onnx_path, threads, _feeds(inputs, batch, num_classes), warmup, repeats, profile_path)


def ort_interleaved(variants: list[dict], batch: int, threads: int, warmup: int, repeats: int) -> dict:
    """Worker (torch-free): the denoisers take turns of TURN_STEPS steps, `repeats` rounds in one process.

    On this shared virtual machine two measurements minutes apart differ by up to 35% (hypervisor steal,
    cache and frequency state); within a round both sides of a ratio run under the same conditions.
    """
    sessions = []
    for variant in variants:
        session = ort_session(variant["onnx_path"], threads)
        feeds = _feeds(variant["inputs"], batch, variant["num_classes"])
        for _ in range(warmup):
            session.run(None, feeds)
        sessions.append((variant["label"], session, feeds))
    runs: dict[str, list[float]] = {label: [] for label, _, _ in sessions}
    for _ in range(repeats):
        for label, session, feeds in sessions:
            session.run(None, feeds)  # re-warms the caches the other denoisers' turns took over
            for _ in range(TURN_STEPS - 1):
                start = time.perf_counter()
                session.run(None, feeds)
                runs[label].append((time.perf_counter() - start) * 1e3)
    rows = {label: {"status": "ok", "median_ms": statistics.median(times), "min_ms": min(times), "runs_ms": times}
            for label, times in runs.items()}
    return {"rounds": repeats, "turn_steps": TURN_STEPS, "rows": rows}


def export_peer(model: str, batch: int, out_path: str) -> dict:
    """Worker: diffusers DiTTransformer2DModel with `model`'s config, exported with plain torch.onnx.export."""
    import torch
    from diffusers import DiTTransformer2DModel

    import models

    _, config = models.registry.CONFIGS[models.registry.canonical_name(model)]
    if "patch_size" not in config:
        raise Unavailable(f"diffusers has no counterpart of {model} (DiTTransformer2DModel is plain DiT)")
    net = models.create_model(model)
    heads = config["num_heads"]
    transformer = DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=config["hidden_size"] // heads,
        in_channels=net.in_channels, out_channels=net.out_channels, num_layers=config["depth"],
        sample_size=net.input_size, patch_size=config["patch_size"], num_embeds_ada_norm=net.num_classes,
    ).eval()

    class Peer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, x, t, y):
            return self.transformer(x, timestep=t, class_labels=y, return_dict=False)[0]

    x, _, y = _torch_inputs(net, batch)
    t = torch.full((batch,), 500, dtype=torch.int64)
    with torch.inference_mode():
        torch.onnx.export(Peer().eval(), (x, t, y), out_path, input_names=["x", "t", "y"], output_names=["out"])
    inputs = [{"name": "x", "dtype": "float32", "shape": list(x.shape)},
              {"name": "t", "dtype": "int64", "shape": [batch]}, {"name": "y", "dtype": "int64", "shape": [batch]}]
    return {"inputs": inputs, "num_classes": net.num_classes,
            "params": sum(p.numel() for p in transformer.parameters())}


def _with_gflops(row: dict, macs: int | None) -> dict:
    if ok(row) and macs:
        row["gflops"] = 2 * macs / (row["median_ms"] * 1e-3) / 1e9
    return row


def _profile_path(settings: Settings, model: str, backend: str) -> str | None:
    if settings.profile_dir is None:
        return None
    return str(settings.profile_dir / f"denoiser_{model}_{backend}.txt")


def measure_model(settings: Settings, model: str) -> tuple[list[dict], dict]:
    """All backend rows for one model, plus the export/calibration records of its packages."""
    timing = {"batch": BATCH, "threads": settings.threads, **settings.timing()}
    rows = []
    eager = run_worker(settings, "benchmarks.denoiser:torch_step",
                       {"model": model, **timing, "profile_path": _profile_path(settings, model, "torch_eager")},
                       label=f"denoiser_{model}_torch_eager")
    macs = eager.get("macs")
    rows.append(eager | {"backend": "torch_eager"})
    if settings.quick:
        rows.append({"backend": "torch_compile", "status": "skipped: --quick (inductor compiles for minutes)"})
    else:
        rows.append(run_worker(settings, "benchmarks.denoiser:torch_step", {"model": model, **timing, "compile": True},
                               label=f"denoiser_{model}_torch_compile", timeout=settings.compile_timeout)
                    | {"backend": "torch_compile"})

    found, exports = package_with(settings, model, PRECISIONS)
    for precision in PRECISIONS:
        backend = f"ort_{precision}"
        if precision not in found:
            reasons = [row["status"] for row in exports.values() if not ok(row)]
            rows.append({"backend": backend, "status": reasons[0] if reasons else
                         f"unavailable: the package has no {precision} denoiser"})
            continue
        manifest = read_manifest(found[precision])
        entry = manifest["denoiser"]["precisions"][precision]
        session = {"onnx_path": str(found[precision] / entry["file"]), "inputs": entry["inputs"],
                   "num_classes": manifest["classes"]["num_classes"]}
        rows.append(run_worker(settings, "benchmarks.denoiser:ort_step", {
            **session, **timing, "profile_path": _profile_path(settings, model, backend)},
            label=f"denoiser_{model}_{backend}") | {"backend": backend, "session": session})

    peer_path = settings.workdir / "peers" / f"{model}_diffusers.onnx"
    peer_path.parent.mkdir(exist_ok=True)
    if model.startswith("dit_"):
        peer = run_worker(settings, "benchmarks.denoiser:export_peer",
                          {"model": model, "batch": BATCH, "out_path": str(peer_path)}, label=f"peer_export_{model}")
    else:
        peer = {"status": "n/a: diffusers has no U-DiT (DiTTransformer2DModel is plain DiT)"}
    if ok(peer):
        session = {"onnx_path": str(peer_path), "inputs": peer["inputs"], "num_classes": peer["num_classes"]}
        row = run_worker(settings, "benchmarks.denoiser:ort_step", {
            **session, **timing, "profile_path": _profile_path(settings, model, "peer")}, label=f"denoiser_{model}_peer")
        row |= {"peer_params": peer["params"], "session": session}
    else:
        row = {"status": peer["status"]}
    rows.append(row | {"backend": "peer_diffusers_ort"})
    for row in rows:
        row["model"] = model
        _with_gflops(row, macs)
    return rows, {"macs": macs, "exports": exports}


PAIRED_BACKENDS = ("ort_fp32", "ort_int8", "peer_diffusers_ort")


def measure_paired(settings: Settings, models_: tuple[str, ...], rows: list[dict]) -> dict:
    """The ORT rows behind the ratio targets (first DiT and first U-DiT), again, interleaved in one process."""
    ratio_models = [next((m for m in models_ if m.startswith(family)), None) for family in ("dit", "udit")]
    variants = [{"label": f"{row['model']}/{row['backend']}", **row["session"]} for row in rows
                if row["model"] in ratio_models and row["backend"] in PAIRED_BACKENDS and ok(row)]
    if len(variants) < 2:
        return {"status": "unavailable: fewer than two ONNX Runtime denoisers were measured"}
    rounds = settings.repeats if settings.quick else 3 * settings.repeats
    return run_worker(settings, "benchmarks.denoiser:ort_interleaved",
                      {"variants": variants, "batch": BATCH, "threads": settings.threads,
                       "warmup": settings.warmup, "repeats": rounds}, label="denoiser_paired")


def run(settings: Settings) -> dict:
    models_ = QUICK_MODELS if settings.quick else FULL_MODELS
    rows, details = [], {}
    for model in models_:
        model_rows, details[model] = measure_model(settings, model)
        rows.extend(model_rows)
    return {"batch": BATCH, "latent": "4x32x32", "models": list(models_), "rows": rows, "details": details,
            "paired": measure_paired(settings, models_, rows)}
