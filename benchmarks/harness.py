"""Timing harness: warm-up then the median of repeated runs, one fresh process per measurement.

Why one process per measurement: torch's OpenMP pool and ONNX Runtime's spinning thread pool steal the
same 2 cores from each other when they share a process, and a fresh process gives each measurement its
own peak RSS (from os.wait4, so the whole process including imports counts). The thread count is fixed
through the environment before the worker imports numpy, torch or onnxruntime, and reported.

Nothing here imports torch: the runtime workers must stay torch-free.
"""
from __future__ import annotations

import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


class Unavailable(Exception):
    """A benchmarked piece is missing or cannot run here; the row records the reason instead of failing."""


@dataclass
class Settings:
    """What every section needs: mode, thread count, repetitions, where work files and logs go."""
    quick: bool
    threads: int
    workdir: Path
    warmup: int = 1
    repeats: int = 5
    profile_dir: Path | None = None  # where --profile writes per-op tables; None = no profiling
    compile_timeout: float = 300.0
    worker_timeout: float = 900.0
    max_steal: float = 0.05  # share of CPU time the hypervisor may take before a measurement is repeated
    steal_retries: int = 2
    log_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.log_dir = self.workdir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)

    def timing(self) -> dict:
        """Warm-up and repeat counts, as keyword arguments of a worker."""
        return {"warmup": self.warmup, "repeats": self.repeats}


def time_call(fn: Callable[[], Any], warmup: int, repeats: int) -> dict:
    """Run fn `warmup` times untimed, then `repeats` timed runs; milliseconds, median first."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(runs), "min_ms": min(runs), "runs_ms": runs,
            "warmup": warmup, "repeats": repeats}


def thread_env(threads: int) -> dict[str, str]:
    """Environment of a worker: fixed thread counts for every BLAS/OpenMP pool, repo on the path."""
    env = dict(os.environ)
    for name in THREAD_VARIABLES:
        env[name] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TQDM_DISABLE", "1")
    return env


def cpu_jiffies() -> tuple[int, int]:
    """(stolen, total) CPU time of the whole machine from /proc/stat, in clock ticks; (0, 0) if unknown.

    On a shared virtual machine the hypervisor can take the cores away for minutes ("steal"), which
    slows a measurement 2-3x without any sign in the process itself; recording it makes such a row visible.
    """
    try:
        fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields)


def steal_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Fraction of the machine's CPU time stolen by the hypervisor between two cpu_jiffies() readings."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else 0.0


def _last_error_line(log: Path) -> str:
    """The line of a log that says why a process failed (the last non-empty line, usually the exception)."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return lines[-1][:300] if lines else "no output"


def run_process(argv: list[str], settings: Settings, label: str, timeout: float | None = None,
                cwd: Path | None = None) -> dict:
    """Run argv in its own session; returns wall and CPU time, peak RSS (MiB), exit status and the log path.

    On timeout the whole process group is killed and `status` says so; callers turn a non-"ok" status
    into an "unavailable: ..." row.
    """
    timeout = settings.worker_timeout if timeout is None else timeout
    log = settings.log_dir / f"{label}.log"
    jiffies = cpu_jiffies()
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=thread_env(settings.threads),
                                cwd=cwd or REPO_ROOT, start_new_session=True)
        timed_out = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - start > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                pid, status, usage = os.wait4(proc.pid, 0)
                timed_out = True
                break
            time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    result = {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024,
              "returncode": proc.returncode, "log": str(log), "steal": steal_share(jiffies, cpu_jiffies())}
    if timed_out:
        result["status"] = f"timeout after {timeout:.0f} s"
    elif proc.returncode != 0:
        result["status"] = f"exit {proc.returncode}: {_last_error_line(log)}"
    else:
        result["status"] = "ok"
    return result


def run_worker(settings: Settings, target: str, kwargs: dict, label: str, timeout: float | None = None) -> dict:
    """Call `module:function(**kwargs)` in a fresh interpreter (benchmarks.worker); its dict plus process stats.

    The worker's own dict decides the status when it ran ("ok" or "unavailable: ..."); a crash, a
    timeout or a non-zero exit becomes "unavailable: <reason>". A measurement during which the hypervisor
    stole more than `settings.max_steal` of the CPU is taken again (up to `settings.steal_retries` times)
    and the least disturbed one is kept; its steal share is in the row.
    """
    attempts = [_run_worker_once(settings, target, kwargs, label, timeout)]
    while (ok(attempts[-1]) and attempts[-1]["process"]["steal"] > settings.max_steal
           and len(attempts) <= settings.steal_retries):
        attempts.append(_run_worker_once(settings, target, kwargs, label, timeout))
    best = min(attempts, key=lambda row: row["process"]["steal"])
    best["process"]["attempts"] = len(attempts)
    return best


def _run_worker_once(settings: Settings, target: str, kwargs: dict, label: str, timeout: float | None) -> dict:
    with tempfile.TemporaryDirectory(dir=settings.workdir) as tmp:
        args_path, out_path = Path(tmp) / "args.json", Path(tmp) / "result.json"
        args_path.write_text(json.dumps(kwargs))
        argv = [sys.executable, "-m", "benchmarks.worker", target, str(args_path), str(out_path)]
        process = run_process(argv, settings, label, timeout)
        result = json.loads(out_path.read_text()) if out_path.exists() else {}
    if process["status"] != "ok" and not str(result.get("status", "")).startswith("unavailable"):
        result["status"] = f"unavailable: {process['status']}"
    result.setdefault("status", "ok")
    result["process"] = {key: process[key] for key in ("wall_s", "cpu_s", "peak_rss_mb", "log", "steal")}
    return result


def ok(row: dict) -> bool:
    return row.get("status") == "ok"


def fit_exponent(sizes: list[float], times: list[float]) -> float:
    """Least-squares slope of log(time) against log(size): 1 is linear, 2 quadratic."""
    if len(sizes) < 2:
        raise ValueError("need at least two sizes to fit a scaling exponent")
    xs = [math.log(size) for size in sizes]
    ys = [math.log(t) for t in times]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def cpu_description() -> dict:
    """CPU model, core count and the ISA flags that decide int8 speed (AVX-512 VNNI, AMX)."""
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
    return {"model": model, "logical_cores": os.cpu_count(), "isa": [flag for flag in wanted if flag in flags]}


def ort_session(model: str | bytes, threads: int, profile_prefix: str | None = None):
    """ONNX Runtime CPU session as every ORT measurement opens it: fixed intra-op threads, full graph
    optimisation, sequential execution (what a single-stream sampler does); optional per-op profiling."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    from runtime.sessions import DISABLED_OPTIMIZERS  # the runtime's own session settings

    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=DISABLED_OPTIMIZERS)


def ort_op_totals(trace_path: str | Path) -> tuple[int, dict[str, tuple[float, int]]]:
    """(runs, {op type: (total ms, calls)}) from an ONNX Runtime profile trace (Chrome trace JSON)."""
    events = json.loads(Path(trace_path).read_text())
    runs = sum(1 for event in events if event.get("name") == "model_run")
    totals: dict[str, tuple[float, int]] = {}
    for event in events:
        if event.get("cat") == "Node" and str(event.get("name", "")).endswith("_kernel_time"):
            op_type = event.get("args", {}).get("op_name", "?")
            ms, calls = totals.get(op_type, (0.0, 0))
            totals[op_type] = (ms + event.get("dur", 0) / 1e3, calls + 1)
    return runs, totals


def ort_profile_summary(trace_path: str | Path, top: int = 20) -> str:
    """Top op types by total time from an ONNX Runtime profile trace, as a text table."""
    runs, totals = ort_op_totals(trace_path)
    grand = sum(ms for ms, _ in totals.values()) or 1.0
    lines = [f"ONNX Runtime per-op profile over {runs} run(s); times summed over runs",
             f"{'op type':<32}{'total ms':>12}{'share':>8}{'calls':>8}"]
    for op_type, (ms, calls) in sorted(totals.items(), key=lambda item: -item[1][0])[:top]:
        lines.append(f"{op_type:<32}{ms:>12.2f}{ms / grand:>8.1%}{calls:>8}")
    return "\n".join(lines) + "\n"


def timed_ort_run(model_path: str, threads: int, feeds: dict, warmup: int, repeats: int,
                  profile_path: str | None = None) -> dict:
    """Median session.run(feeds) of an ONNX model; with profile_path, a second, profiled session (so profiling
    overhead never enters the timing) runs as often, its per-op summary is written there and its per-run
    milliseconds per op type are returned as `op_ms` (the report splits them into GEMM and the rest)."""
    session = ort_session(model_path, threads)
    result = time_call(lambda: session.run(None, feeds), warmup, repeats)
    del session
    if profile_path:
        profiled = ort_session(model_path, threads, str(Path(profile_path).with_suffix("")))
        for _ in range(warmup + repeats):
            profiled.run(None, feeds)
        trace = profiled.end_profiling()
        Path(profile_path).write_text(ort_profile_summary(trace))
        runs, totals = ort_op_totals(trace)
        result["op_ms"] = {op_type: ms / max(runs, 1) for op_type, (ms, _) in totals.items()}
        Path(trace).unlink(missing_ok=True)
        result["profile"] = str(profile_path)
    return result
