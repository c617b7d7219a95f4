"""python -m benchmarks [--quick]: measure every figure of the performance issue, write JSON, BENCHMARKS.md, plots.

Sections: gemm (fp32 GEMM ceiling), denoiser (step latency per backend), attention (scaling over token
grids), sampling (runtime vs DiTPipeline end to end, `import runtime`), export_train (dit-export time,
training throughput). The full run takes about 30-35 minutes on the 2-core CPU machine; --quick uses tiny
models and grids with 1-2 repetitions (CI checks that the harness works, not the numbers).
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import typer

from benchmarks import report
from benchmarks.harness import REPO_ROOT, Settings, cpu_description, cpu_jiffies, steal_share

app = typer.Typer(add_completion=False, help=__doc__)


def _section_modules() -> dict:
    from benchmarks import attention, denoiser, export_train, gemm, sampling

    return {"gemm": gemm, "denoiser": denoiser, "attention": attention, "sampling": sampling,
            "export_train": export_train}


def _parse_only(only: Optional[str]) -> list[str]:
    if not only:
        return list(report.SECTIONS)
    chosen = [name.strip() for name in only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in report.SECTIONS]
    if unknown or not chosen:
        raise typer.BadParameter(f"unknown section(s) {', '.join(unknown) or '(none given)'}; "
                                 f"valid choices: {', '.join(report.SECTIONS)}", param_hint="--only")
    return [name for name in report.SECTIONS if name in chosen]


@app.command(help=__doc__)
def main(
    quick: bool = typer.Option(False, "--quick", help="Tiny models and grids, 1-2 repetitions (CI smoke run)."),
    only: Optional[str] = typer.Option(None, help=f"Comma-separated sections to run: {', '.join(report.SECTIONS)}."),
    threads: int = typer.Option(os.cpu_count() or 1, min=1, help="Threads of every BLAS/OpenMP/ORT pool."),
    repeats: Optional[int] = typer.Option(None, min=1, help="Timed runs per measurement (default 5; 2 with --quick)."),
    results_dir: Optional[Path] = typer.Option(
        None, help="Where the JSON and PNG files go (default benchmarks/results, or benchmarks/results/quick)."),
    markdown: Optional[Path] = typer.Option(
        None, help="BENCHMARKS.md to regenerate (default at the repo root; inside the results dir with --quick)."),
    workdir: Optional[Path] = typer.Option(
        None, help="Keep exported packages and logs here and reuse them in later runs (default: a temp dir)."),
    profile: bool = typer.Option(False, help="Save ONNX Runtime per-op and torch profiler tables to <results>/profiles."),
    compile_timeout: float = typer.Option(300.0, min=1.0, help="Seconds torch.compile may take per model."),
) -> None:
    sections = _parse_only(only)
    if results_dir is None:
        results_dir = REPO_ROOT / "benchmarks" / "results" / ("quick" if quick else "")
    if markdown is None:
        markdown = results_dir / "BENCHMARKS.md" if quick else REPO_ROOT / "BENCHMARKS.md"
    keep = workdir is not None
    workdir = Path(workdir) if keep else Path(tempfile.mkdtemp(prefix="dit-edge-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    profile_dir = results_dir / "profiles" if profile else None
    if profile_dir:
        profile_dir.mkdir(parents=True, exist_ok=True)
    settings = Settings(quick=quick, threads=threads, workdir=workdir.resolve(), repeats=repeats or (2 if quick else 5),
                        profile_dir=profile_dir, compile_timeout=compile_timeout,
                        steal_retries=0 if quick else 2)  # quick numbers mean nothing: never measure twice
    cpu = cpu_description()
    modules = _section_modules()
    try:
        for name in sections:
            meta = report.run_meta(quick, threads, cpu)
            start, jiffies = time.perf_counter(), cpu_jiffies()
            typer.echo(f"[benchmarks] {name} ...", err=True)
            data = modules[name].run(settings)
            path = report.save_section(results_dir, name, data, meta | {
                "seconds": time.perf_counter() - start, "steal_share": steal_share(jiffies, cpu_jiffies())})
            typer.echo(f"[benchmarks] {name} done in {time.perf_counter() - start:.0f} s -> {path}", err=True)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    markdown_path, plots, targets = report.write_report(results_dir, markdown)
    typer.echo(f"[benchmarks] wrote {markdown_path} and {len(plots)} plot(s) in {results_dir}", err=True)
    typer.echo(report.headline(targets))


if __name__ == "__main__":
    sys.exit(app())
