"""Results on disk: one JSON per section, BENCHMARKS.md with tables and PNG plots, the README headline table.

The targets of the performance issue are checked here from whatever section files the results folder
holds, so re-running one section after an optimisation updates the report without redoing the rest
(each section's timestamp is shown). Missing measurements show as "unavailable" with their reason.
"""
from __future__ import annotations

import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from benchmarks.sampling import LOW_MEMORY_ROW

SECTIONS = ("gemm", "denoiser", "attention", "sampling", "export_train")
BACKEND_LABELS = {
    "torch_eager": "torch eager fp32", "torch_compile": "torch.compile fp32", "ort_fp32": "ORT fp32",
    "ort_fp16": "ORT fp16", "ort_int8": "ORT int8", "peer_diffusers_ort": "diffusers DiT, plain ONNX export, ORT",
}


# ----------------------------------------------------------------------------------------------- files

def save_section(results_dir: Path, name: str, data: dict, meta: dict) -> Path:
    """Write results_dir/<name>.json (atomic rename, so a killed run never leaves half a file)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"section": name, "meta": meta, **data}, indent=1, default=str))
    tmp.replace(path)
    return path


def load_sections(results_dir: Path) -> dict[str, dict]:
    sections = {}
    for name in SECTIONS:
        path = results_dir / f"{name}.json"
        if path.exists():
            sections[name] = json.loads(path.read_text())
    return sections


def run_meta(quick: bool, threads: int, cpu: dict) -> dict:
    """Mode, threads, CPU and library versions (read from package metadata: no heavy imports)."""
    import platform
    from importlib import metadata

    versions = {}
    for package in ("torch", "onnxruntime", "onnxruntime-gpu", "onnx", "numpy", "diffusers", "dit-edge"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "quick": quick, "threads": threads,
            "cpu": cpu, "load_average_1min": os.getloadavg()[0], "python": platform.python_version(),
            "versions": versions}


# --------------------------------------------------------------------------------------------- lookups

def _ok(row: dict | None) -> bool:
    return bool(row) and row.get("status") == "ok"


def _step(sections: dict, model: str, backend: str) -> dict | None:
    for row in sections.get("denoiser", {}).get("rows", []):
        if row.get("model") == model and row.get("backend") == backend:
            return row
    return None


def _pair(sections: dict, a: tuple[str, str], b: tuple[str, str]) -> tuple[dict | None, dict | None]:
    """Two (model, backend) ORT timings for a ratio: from the interleaved measurement when it has both,
    else each from its own row (never one of each)."""
    paired = sections.get("denoiser", {}).get("paired", {})
    rows = paired.get("rows", {}) if _ok(paired) else {}
    if f"{a[0]}/{a[1]}" in rows and f"{b[0]}/{b[1]}" in rows:
        return tuple(rows[f"{m}/{backend}"] | {"interleaved": True} for m, backend in (a, b))
    return _step(sections, *a), _step(sections, *b)


def _reason(*rows: dict | None) -> str:
    """Why a target could not be evaluated: the first non-ok row's status, or the missing section."""
    for row in rows:
        if row is None:
            return "not measured"
        if not _ok(row):
            return row.get("status", "unavailable")
    return "unavailable"


def _models(sections: dict) -> tuple[str, str]:
    """The small DiT and U-DiT of this run (dit_s_2 / udit_s; --quick measures dit_tiny_2 only)."""
    names = sections.get("denoiser", {}).get("models", [])
    dit = next((name for name in names if name.startswith("dit")), "dit_s_2")
    udit = next((name for name in names if name.startswith("udit")), "udit_s")
    return dit, udit


# --------------------------------------------------------------------------------------------- targets

def _target(name: str, required: str, check: Callable[[float], bool], value: float | None, shown: str,
            reason: str = "") -> dict:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        status = reason if reason.startswith(("unavailable", "skipped")) else f"unavailable: {reason}"
        return {"target": name, "required": required, "measured": None, "status": status}
    return {"target": name, "required": required, "measured": shown, "value": value,
            "status": "pass" if check(value) else "fail"}


def _ratio_target(name: str, required: str, check, numerator: dict | None, denominator: dict | None,
                  key: str = "median_ms", fmt: str = "{:.2f}x") -> dict:
    if _ok(numerator) and _ok(denominator):
        value = numerator[key] / denominator[key]
        side_by_side = numerator.get("interleaved") and denominator.get("interleaved")
        return _target(name, required, check, value, fmt.format(value) + (" (interleaved)" if side_by_side else ""))
    return _target(name, required, check, None, "", _reason(numerator, denominator))


def evaluate_targets(sections: dict) -> list[dict]:
    """Every target of the performance issue, with the measured value and pass / fail / unavailable."""
    dit, udit = _models(sections)
    targets = []
    ceiling = sections.get("gemm", {}).get("ceiling_gflops")
    fp32 = _step(sections, dit, "ort_fp32")
    if _ok(fp32) and ceiling and "gflops" in fp32:
        share = fp32["gflops"] / ceiling
        targets.append(_target(f"ORT fp32 {dit} step vs fp32 GEMM ceiling", ">= 85%", lambda v: v >= 0.85, share,
                               f"{share:.0%} ({fp32['gflops']:.1f} of {ceiling:.1f} GFLOP/s)"))
    else:
        targets.append(_target(f"ORT fp32 {dit} step vs fp32 GEMM ceiling", ">= 85%", bool, None, "",
                               _reason(fp32) if not _ok(fp32) else "no GEMM ceiling measured"))
    targets.append(_ratio_target(f"ORT fp32 {dit} speed-up over torch eager", ">= 1.3x", lambda v: v >= 1.3,
                                 _step(sections, dit, "torch_eager"), fp32))
    # ratios between ORT denoisers come from the interleaved measurement when the run has one
    targets.append(_ratio_target(f"ORT fp32 {dit} speed vs diffusers peer export (peer time / ours)", ">= 1.0x",
                                 lambda v: v >= 1.0,
                                 *_pair(sections, (dit, "peer_diffusers_ort"), (dit, "ort_fp32"))))
    for model in (dit, udit):
        targets.append(_ratio_target(f"ORT int8 {model} speed-up over ORT fp32", ">= 2.0x", lambda v: v >= 2.0,
                                     *_pair(sections, (model, "ort_fp32"), (model, "ort_int8"))))
    targets.append(_ratio_target(f"ORT fp32 {udit} step / {dit} step", "<= 1.25x", lambda v: v <= 1.25,
                                 *_pair(sections, (udit, "ort_fp32"), (dit, "ort_fp32"))))

    attention = sections.get("attention", {}).get("summary", {})
    exponent = attention.get("exponent", {}).get("ort_local_r8")
    grids = attention.get("fit_grids", [])
    span = f" over {grids[0]}^2..{grids[-1]}^2 tokens" if grids else ""
    targets.append(_target(f"ORT local-window r8 scaling exponent{span}", "<= 1.15",
                           lambda v: v <= 1.15, exponent, f"{exponent:.2f}" if exponent is not None else "",
                           "attention section missing or incomplete"))
    speedup = attention.get("full_over_local_r8", {}).get("ort")
    largest = f" at {attention['largest_grid']}^2 tokens" if "largest_grid" in attention else ""
    targets.append(_target(f"ORT local-window r8 speed-up over full attention{largest}", ">= 10x",
                           lambda v: v >= 10, speedup, f"{speedup:.1f}x" if speedup is not None else "",
                           "attention section missing or incomplete"))

    sampling = sections.get("sampling", {})
    rows = {row.get("implementation", "").split()[0]: row for row in sampling.get("rows", [])}
    # both sampling targets on one configuration: the edge one (one model resident at a time) where measured
    edge = LOW_MEMORY_ROW.split()[0]
    name = edge if edge in rows else "runtime.Sampler"
    runtime, pipeline = rows.get(name), rows.get("diffusers")
    steps = sampling.get("steps", 20)
    targets.append(_ratio_target(f"{name} speed-up over DiTPipeline ({steps} dpm++2m steps, CFG)", ">= 1.5x",
                                 lambda v: v >= 1.5, pipeline, runtime))
    targets.append(_ratio_target(f"{name} peak RSS / DiTPipeline peak RSS", "<= 0.5", lambda v: v <= 0.5,
                                 runtime, pipeline, key="peak_rss_mb", fmt="{:.2f}"))
    probe = sampling.get("import_runtime")
    if _ok(probe):
        clean = not probe["torch_loaded"] and not probe["diffusers_loaded"]
        value = probe["median_s"] if clean else float("inf")
        targets.append(_target("`import runtime` time (torch-free)", "< 0.3 s", lambda v: v < 0.3, value,
                               f"{probe['median_s']:.3f} s" + ("" if clean else " (imported torch/diffusers!)")))
    else:
        targets.append(_target("`import runtime` time (torch-free)", "< 0.3 s", bool, None, "", _reason(probe)))

    export_train = sections.get("export_train", {})
    export = export_train.get("export")
    name = export.get("model", "udit_b") if export else "udit_b"
    if _ok(export):
        targets.append(_target(f"dit-export {name} --fp16 wall time", "< 120 s", lambda v: v < 120,
                               export["wall_s"], f"{export['wall_s']:.1f} s"))
    else:
        targets.append(_target(f"dit-export {name} --fp16 wall time", "< 120 s", bool, None, "", _reason(export)))
    train = {row.get("loop"): row for row in export_train.get("train", [])}
    targets.append(_ratio_target("train loop throughput / plain PyTorch loop", ">= 1.0x", lambda v: v >= 1.0,
                                 train.get("train package"), train.get("plain PyTorch"), key="samples_per_s"))
    return targets


# ---------------------------------------------------------------------------------------------- plots

def write_plots(sections: dict, results_dir: Path) -> list[Path]:
    """attention_scaling.png, step_latency.png, sampling.png (those whose data exists)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    attention = sections.get("attention")
    if attention:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for kind, color in zip(("full", "downsampled", "local_r8", "local_r16"), ("C3", "C1", "C0", "C2")):
            for backend, style in (("ort", "-o"), ("torch", "--x")):
                points = sorted((row["tokens"], row["median_ms"]) for row in attention["rows"]
                                if row["kind"] == kind and row["backend"] == backend and _ok(row))
                if points:
                    ax.plot(*zip(*points), style, color=color,
                            label=f"{kind} ({'ONNX Runtime' if backend == 'ort' else 'torch'})")
        ax.set(xscale="log", yscale="log", xlabel="tokens (grid^2)", ylabel="ms per call",
               title="Attention scaling (1 sequence, head_dim 64)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        written.append(_save(fig, results_dir / "attention_scaling.png"))
    denoiser = sections.get("denoiser")
    if denoiser:
        models = denoiser["models"]
        backends = [b for b in BACKEND_LABELS if any(r["backend"] == b and _ok(r) for r in denoiser["rows"])]
        fig, ax = plt.subplots(figsize=(8, 4.5))
        width = 0.8 / max(len(backends), 1)
        for index, backend in enumerate(backends):
            values = [(_step(sections, m, backend) or {}).get("median_ms", 0.0) if _ok(_step(sections, m, backend))
                      else 0.0 for m in models]
            ax.bar([i + index * width for i in range(len(models))], values, width, label=BACKEND_LABELS[backend])
        ax.set_xticks([i + width * (len(backends) - 1) / 2 for i in range(len(models))], models)
        ax.set(ylabel="ms per step (batch 2)", title="Denoiser step latency, 32x32 latent")
        ax.set_yscale("log")
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=7)
        written.append(_save(fig, results_dir / "step_latency.png"))
    sampling = sections.get("sampling")
    if sampling and any(_ok(row) for row in sampling["rows"]):
        rows = [row for row in sampling["rows"] if _ok(row)]
        names = [row["implementation"] for row in rows]
        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
        left.barh(names, [row["median_ms"] / 1e3 for row in rows], color="tab:blue")
        left.set(xlabel="seconds per sample call", title=f"{sampling['steps']} steps {sampling['scheduler']}, CFG")
        right.barh(names, [row["peak_rss_mb"] for row in rows], color="tab:orange")
        right.set(xlabel="peak RSS (MiB)", title="whole process")
        right.set_yticks([])
        written.append(_save(fig, results_dir / "sampling.png"))
    return written


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# -------------------------------------------------------------------------------------------- markdown

def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if cell is None else str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _ms(row: dict | None) -> str:
    return f"{row['median_ms']:.1f}" if _ok(row) else (row or {}).get("status", "not measured")


def targets_table(targets: list[dict]) -> str:
    marks = {"pass": "PASS", "fail": "FAIL"}
    return _table(["target", "required", "measured", "result"],
                  [[t["target"], t["required"], t["measured"] or "", marks.get(t["status"], t["status"])]
                   for t in targets])


def _denoiser_md(section: dict, ceiling: float | None) -> str:
    rows = []
    for model in section["models"]:
        eager = _step({"denoiser": section}, model, "torch_eager")
        for backend, label in BACKEND_LABELS.items():
            row = _step({"denoiser": section}, model, backend)
            if row is None:
                continue
            good = _ok(row)
            rows.append([
                model, label, _ms(row),
                f"{row['gflops']:.1f}" if good and "gflops" in row else "",
                f"{row['gflops'] / ceiling:.0%}" if good and "gflops" in row and ceiling else "",
                f"{eager['median_ms'] / row['median_ms']:.2f}x" if good and _ok(eager) else "",
                f"{row['process']['peak_rss_mb']:.0f}" if good and "process" in row else "",
            ])
    macs = ", ".join(f"{m}: {d['macs'] / 1e9:.2f} GMAC" for m, d in section.get("details", {}).items() if d.get("macs"))
    return (f"Batch {section['batch']} (one CFG pair), latent {section['latent']}; MACs per step: {macs}.\n\n"
            + _table(["model", "backend", "median ms", "GFLOP/s", "of GEMM ceiling", "vs torch eager",
                      "peak RSS MiB"], rows) + "\n\n" + _paired_md(section))


def _paired_md(section: dict) -> str:
    paired = section.get("paired", {})
    if not _ok(paired):
        return f"Side by side: {paired.get('status', 'not measured')}."
    rows = [[label.split("/")[0], BACKEND_LABELS.get(label.split("/")[1], label), f"{row['median_ms']:.1f}",
             f"{row['min_ms']:.1f}"] for label, row in paired["rows"].items()]
    return (f"### Side by side\n\nThe ONNX Runtime denoisers behind the ratio targets, again in one process, taking "
            f"turns of {paired['turn_steps']} steps (the first untimed, to re-warm the caches) for {paired['rounds']} "
            "rounds (the targets' ratios come from here).\n\n"
            + _table(["model", "backend", "median ms", "min ms"], rows))


# Op types that run a weight product in integer arithmetic after ONNX Runtime's QDQ fusions.
INT8_GEMM_OPS = ("MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "QGemm", "QLinearConv", "ConvInteger",
                 "DynamicQuantizeMatMul")
FLOAT_GEMM_OPS = ("MatMul", "FusedMatMul", "Gemm", "Conv")


def int8_breakdown(section: dict) -> list[dict]:
    """Per model with profiled fp32 and int8 rows: where the step time goes, and the best int8 could do.

    Amdahl's bound: if the int8 products took no time at all, the step would still pay for everything
    else (normalisation, GELU, softmax, the float attention products, layout ops, quantize nodes), so
    fp32 step / (int8 step - int8 product time) caps the int8 speed-up of this graph.
    """
    found = []
    for model in section.get("models", []):
        fp32, int8 = _step({"denoiser": section}, model, "ort_fp32"), _step({"denoiser": section}, model, "ort_int8")
        if not (_ok(fp32) and _ok(int8) and "op_ms" in fp32 and "op_ms" in int8):
            continue
        fp32_total, int8_total = sum(fp32["op_ms"].values()), sum(int8["op_ms"].values())
        fp32_gemm = sum(ms for op, ms in fp32["op_ms"].items() if op in FLOAT_GEMM_OPS)
        int8_gemm = sum(ms for op, ms in int8["op_ms"].items() if op in INT8_GEMM_OPS)
        rest = int8_total - int8_gemm
        found.append({"model": model, "fp32_ms": fp32_total, "fp32_gemm_ms": fp32_gemm, "int8_ms": int8_total,
                      "int8_gemm_ms": int8_gemm, "int8_rest_ms": rest,
                      "quantize_ms": sum(int8["op_ms"].get(op, 0.0) for op in ("QuantizeLinear", "DequantizeLinear")),
                      "speedup": fp32_total / int8_total if int8_total else None,
                      "bound": fp32_total / rest if rest else None})
    return found


def _int8_md(found: list[dict]) -> str:
    rows = [[b["model"], f"{b['fp32_ms']:.1f}", f"{b['fp32_gemm_ms']:.1f}", f"{b['int8_ms']:.1f}",
             f"{b['int8_gemm_ms']:.1f}", f"{b['int8_rest_ms']:.1f}", f"{b['quantize_ms']:.1f}",
             f"{b['speedup']:.2f}x", f"{b['bound']:.2f}x"] for b in found]
    return ("Per-op profiles (`--profile`, ms per step, summed over op types). The int8 denoiser quantizes the weight "
            "products only; everything else stays float, so the last column, fp32 step / (int8 step minus its int8 "
            "products), is the speed-up int8 could reach even if its products were free.\n\n"
            + _table(["model", "fp32 step", "fp32 products", "int8 step", "int8 products", "int8 rest",
                      "of which Q/DQ", "int8 speed-up", "bound (free products)"], rows))


def _attention_md(section: dict) -> str:
    grids = section["grids"]
    summary = section["summary"]
    rows = []
    for kind in ("full", "downsampled", "local_r8", "local_r16"):
        for backend in ("ort", "torch"):
            cells = {row["grid"]: row for row in section["rows"] if row["kind"] == kind and row["backend"] == backend}
            exponent = summary["exponent"].get(f"{backend}_{kind}")
            rows.append([kind, "ONNX Runtime" if backend == "ort" else "torch eager",
                         *[_ms(cells.get(g)) for g in grids], f"{exponent:.2f}" if exponent is not None else ""])
    span = f"{summary['fit_grids'][0]}^2..{summary['fit_grids'][-1]}^2" if summary["fit_grids"] else "-"
    return (f"Batch {section['batch']}, {section['heads']} head, head_dim {section['head_dim']}; median ms per call; "
            f"exponent fitted over {span} tokens.\n\n"
            + _table(["attention", "backend", *[f"{g}^2" for g in grids], "exponent"], rows))


def _sampling_md(section: dict) -> str:
    rows = []
    for row in section["rows"]:
        if _ok(row):
            rows.append([row["implementation"], f"{row['median_ms'] / 1e3:.2f}", f"{row['first_sample_s']:.2f}",
                         f"{row['import_s']:.2f}", f"{row['load_s']:.2f}", f"{row['cold_s']:.2f}",
                         f"{row['peak_rss_mb']:.0f}"])
        else:
            rows.append([row["implementation"], row["status"], "", "", "", "", ""])
    probe = section["import_runtime"]
    imported = (f"`import runtime` in a fresh interpreter: median {probe['median_s'] * 1e3:.0f} ms over "
                f"{len(probe['runs_s'])} runs; torch imported: {probe['torch_loaded']}."
                if _ok(probe) else f"`import runtime`: {probe['status']}")
    image = section.get("pipeline", {}).get("image_size")
    return (f"{section['steps']} steps of {section['scheduler']}, guidance {section['guidance_scale']}, labels "
            f"{section['labels']}, {image} px, same weights on both sides. Sample time: median of the calls after "
            f"the first; cold = import + load + first sample.\n\n"
            + _table(["implementation", "sample s", "first sample s", "import s", "load s", "cold s",
                      "peak RSS MiB"], rows) + "\n\n" + imported)


def _export_train_md(section: dict) -> str:
    parts = []
    export = section.get("export")
    if export:
        parts.append(f"`{export.get('command', 'dit-export')}`: "
                     + (f"{export['wall_s']:.1f} s, peak RSS {export['peak_rss_mb']:.0f} MiB" if _ok(export)
                        else export["status"]))
    rows = [[row["loop"], f"{row['samples_per_s']:.2f}" if _ok(row) else row["status"],
             f"{row['median_ms']:.0f}" if _ok(row) else ""] for row in section.get("train", [])]
    if rows:
        rounds = max((row.get("rounds", 1) for row in section.get("train", [])), default=1)
        parts.append(f"Training step, {section.get('train_model')} at batch {section.get('train_batch')}"
                     + (f" (each loop run {rounds} times, alternating; step times pooled)" if rounds > 1 else "")
                     + ":\n\n"
                     + _table(["loop", "samples/s", "median ms per step"], rows))
    return "\n\n".join(parts)


def markdown(sections: dict, targets: list[dict], plots: list[Path], profiles: list[Path], markdown_path: Path) -> str:
    meta = next(iter(sections.values()))["meta"] if sections else {}
    quick = any(section["meta"].get("quick") for section in sections.values())
    lines = ["# Benchmarks", "",
             "Generated by `python -m benchmarks` (do not edit by hand). "
             + ("**Quick mode: tiny models and grids, 1-2 repetitions; the numbers mean nothing.**" if quick else
                "Medians after warm-up; every measurement in its own process with a fixed thread count."), ""]
    if meta:
        cpu = meta["cpu"]
        versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
        lines += [f"Machine: {cpu['model']}, {cpu['logical_cores']} logical cores, ISA {' '.join(cpu['isa'])}; "
                  f"{meta['threads']} threads (a 1-minute load average near or above the core count inflates the "
                  f"numbers, torch's most); Python {meta['python']}; {versions}.", ""]
    lines += ["Sections, when they were measured, the load average then and the share of CPU time the hypervisor "
              "stole (a measurement disturbed by more than 5% steal is taken again, the least disturbed kept): "
              + ", ".join(f"{name} ({section['meta']['date']}, load {section['meta'].get('load_average_1min', 0):.1f}, "
                          f"steal {section['meta'].get('steal_share', 0):.0%})"
                          for name, section in sections.items()), "",
              "## Targets", "", targets_table(targets), ""]
    gemm = sections.get("gemm")
    if gemm:
        rows = [[row["library"], _ms(row), f"{row['gflops']:.1f}" if _ok(row) else ""] for row in gemm["rows"]]
        lines += ["## fp32 GEMM ceiling", "", f"{gemm['n']}^3 product; ceiling = best library.", "",
                  _table(["library", "median ms", "GFLOP/s"], rows), ""]
    sections_md = (("denoiser", "Denoiser step latency",
                    lambda s: _denoiser_md(s, (gemm or {}).get("ceiling_gflops"))),
                   ("attention", "Attention scaling", _attention_md),
                   ("sampling", "End-to-end sampling", _sampling_md),
                   ("export_train", "Export and training", _export_train_md))
    for name, title, render in sections_md:
        if name in sections:
            lines += [f"## {title}", "", render(sections[name]), ""]
        breakdown = int8_breakdown(sections[name]) if name == "denoiser" and name in sections else []
        if breakdown:
            lines += ["### Where the int8 step time goes", "", _int8_md(breakdown), ""]
    if plots:
        lines += ["## Plots", ""]
        for plot in plots:
            relative = Path(_relative(plot, markdown_path.parent))
            lines += [f"![{plot.stem}]({relative.as_posix()})", ""]
    if profiles:
        lines += ["## Profiles (`--profile`)", "", "ONNX Runtime per-op totals and torch profiler tables:", ""]
        lines += [f"- [{profile.stem}]({_relative(profile, markdown_path.parent)})" for profile in profiles] + [""]
    return "\n".join(lines)


def _relative(path: Path, start: Path) -> str:
    import os

    return os.path.relpath(path.resolve(), start.resolve())


def headline(targets: list[dict]) -> str:
    """The table the README shows: each target, what was required and measured."""
    return targets_table(targets)


def write_report(results_dir: Path, markdown_path: Path) -> tuple[Path, list[Path], list[dict]]:
    """Regenerate the plots and BENCHMARKS.md from the section files; returns the paths and the targets."""
    sections = load_sections(results_dir)
    targets = evaluate_targets(sections)
    plots = write_plots(sections, results_dir)
    (results_dir / "targets.json").write_text(json.dumps(targets, indent=1))
    markdown_path.parent.mkdir(parents=True, exist_ok=True)
    profiles = sorted((results_dir / "profiles").glob("*.txt"))
    markdown_path.write_text(markdown(sections, targets, plots, profiles, markdown_path))
    return markdown_path, plots, targets
