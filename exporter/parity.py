"""Parity data and `dit-parity`: Polygraphy compares ONNX Runtime (and TensorRT) against stored PyTorch outputs.

The export stores Polygraphy-format inputs (batch 2, or the static batch: timesteps including 0 and
999, labels including the null label, noisy latents as a sampler would feed them) and the fp32
PyTorch outputs as RunResults from the runner "pytorch". `dit-parity PACKAGE` runs `polygraphy run <onnx> --onnxrt --load-inputs
--load-outputs` per precision: fp32 passes when max |ort - torch| <= 1e-4 * max |torch| (the output's
scale), fp16 when the cosine similarity to the fp32 PyTorch output is >= 0.999 on every iteration.
"""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import typer

from exporter.manifest import TOLERANCES, load_manifest, validate_manifest, verify_files

INPUTS_FILE = "parity/inputs.json"
OUTPUTS_FILE = "parity/torch_outputs.json"
RUNNER_NAME = "pytorch"
# timesteps of the stored samples, in order; 0 and 999 are the ends of the schedule
TIMESTEPS = (0, 999, 999, 0, 250, 750, 500, 1)


def _alphas_cumprod(diffusion: dict) -> np.ndarray:
    n = diffusion["num_train_timesteps"]
    betas = np.linspace(diffusion["beta_start"], diffusion["beta_end"], n, dtype=np.float64)
    if diffusion.get("beta_schedule") == "scaled_linear":
        betas = np.linspace(diffusion["beta_start"] ** 0.5, diffusion["beta_end"] ** 0.5, n) ** 2
    return np.cumprod(1.0 - betas)


def parity_feeds(latent: tuple[int, int, int], num_classes: int, diffusion: dict, batch: int = 2,
                 seed: int = 0) -> list[dict]:
    """Feed dicts {x, t, y} in the graph's dtypes covering TIMESTEPS, every other label the null label;
    x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps as a sampler feeds it. At least 4 iterations of `batch`."""
    rng = np.random.default_rng(seed)
    acp = _alphas_cumprod(diffusion)
    iterations = max(4, -(-len(TIMESTEPS) // batch))
    feeds = []
    for i in range(iterations):
        k = np.arange(i * batch, (i + 1) * batch)
        t = np.minimum(np.array(TIMESTEPS)[k % len(TIMESTEPS)], len(acp) - 1)
        x0 = rng.standard_normal((batch, *latent)).clip(-3, 3)
        a = acp[t].reshape(batch, 1, 1, 1)
        x = np.sqrt(a) * x0 + np.sqrt(1 - a) * rng.standard_normal((batch, *latent))
        y = np.where(k % 2 == 1, num_classes, rng.integers(0, num_classes, batch))
        feeds.append({"x": x.astype(np.float32), "t": t.astype(np.float32), "y": y.astype(np.int64)})
    return feeds


def write_parity_data(model, feeds: list[dict], package_dir: str | Path) -> None:
    """Save the feeds and the float32 PyTorch outputs of `model(x, t, y)` in Polygraphy's JSON formats."""
    import torch
    from polygraphy.comparator import IterationResult, RunResults
    from polygraphy.json import save_json

    iterations = []
    with torch.no_grad():
        for feed in feeds:
            out = model(torch.from_numpy(feed["x"]), torch.from_numpy(feed["t"]), torch.from_numpy(feed["y"]))
            iterations.append(IterationResult({"out": out.float().numpy()}, runner_name=RUNNER_NAME))
    root = Path(package_dir)
    (root / "parity").mkdir(parents=True, exist_ok=True)
    results = RunResults()
    results.append((RUNNER_NAME, iterations))
    with _quiet_polygraphy():
        save_json(feeds, str(root / INPUTS_FILE))
        results.save(str(root / OUTPUTS_FILE))


@contextlib.contextmanager
def _quiet_polygraphy() -> Iterator[None]:
    """Polygraphy announces every file it saves or loads (here, staging paths renamed later) and, on its first
    message, that the optional `colored` module is missing; warnings and errors still show."""
    from polygraphy.logger import G_LOGGER

    colors, G_LOGGER.colors = G_LOGGER.colors, False
    try:
        with G_LOGGER.verbosity(G_LOGGER.WARNING):
            yield
    finally:
        G_LOGGER.colors = colors


def output_scale(outputs_path: str | Path) -> dict[str, float]:
    """max |ref| per output over all stored iterations: the scale the fp32 tolerance is relative to."""
    from polygraphy.comparator import RunResults

    with _quiet_polygraphy():
        results = RunResults.load(str(outputs_path))
    scale: dict[str, float] = {}
    for _, iterations in results.items():
        for iteration in iterations:
            for name, array in iteration.items():
                scale[name] = max(scale.get(name, 0.0), float(np.abs(array).max()))
    return scale


def polygraphy_command(onnx_path: Path, inputs: Path, outputs: Path, precision: str, scale: dict[str, float],
                       tolerances: dict) -> list[str]:
    """`polygraphy run` arguments comparing ONNX Runtime with the stored PyTorch outputs."""
    cmd = [sys.executable, "-c", "import sys; from polygraphy.tools import main; sys.exit(main())",
           "run", str(onnx_path), "--onnxrt", "--load-inputs", str(inputs), "--load-outputs", str(outputs),
           "--validate"]
    if precision == "fp16":
        threshold = tolerances.get("fp16", TOLERANCES["fp16"])["cosine_similarity"]
        cmd += ["--compare", "cosine_similarity", "--cosine-similarity-threshold", str(threshold)]
    else:
        ratio = tolerances.get("fp32", TOLERANCES["fp32"])["max_abs_error_over_scale"]
        atol = [f"{name}:{ratio * s:.6g}" for name, s in scale.items()]
        cmd += ["--check-error-stat", "max", "--atol", *atol, "--rtol", "0"]
    return cmd


# Polygraphy lines worth showing without --verbose: per-iteration error statistics and verdicts.
_SUMMARY_MARKERS = ("Iteration:", "Minimum Required Tolerance", "Absolute Difference", "Cosine Similarity:",
                    "FAILED", "is not valid", "Accuracy Summary", "PASSED | Runtime", "Error", "error")


def run_onnxrt(package_dir: Path, manifest: dict, precision: str, verbose: bool = False) -> bool:
    parity = manifest["parity"]
    entry = manifest["denoiser"]["precisions"][precision]
    outputs = package_dir / parity["outputs"].get(precision, parity["outputs"]["fp32"])
    scale = output_scale(outputs)
    cmd = polygraphy_command(package_dir / entry["file"], package_dir / parity["inputs"], outputs, precision, scale,
                             parity.get("tolerances", TOLERANCES))
    typer.echo(f"== {precision}: ONNX Runtime vs PyTorch ({entry['file']}); output scale "
               + ", ".join(f"{k}={v:.4g}" for k, v in scale.items()))
    with tempfile.TemporaryDirectory() as tmp:
        accuracy_path = Path(tmp) / "accuracy.json"
        proc = subprocess.run([*cmd, "--save-accuracy-results", str(accuracy_path)], cwd=package_dir,
                              capture_output=True, text=True)
        metrics = _iteration_metrics(accuracy_path) if accuracy_path.is_file() else {}
    lines = (proc.stdout + proc.stderr).splitlines()
    if not verbose:
        lines = [line for line in lines if any(marker in line for marker in _SUMMARY_MARKERS)]
    typer.echo("\n".join(lines))
    for name, values in metrics.items():
        if precision == "fp16":
            typer.echo(f"{precision} {name}: 1 - cosine similarity per iteration "
                       + " ".join(f"{1 - v['cosine_similarity']:.3g}" for v in values))
        else:
            typer.echo(f"{precision} {name}: max |ort - torch| / scale per iteration "
                       + " ".join(f"{v['max_absdiff'] / scale[name]:.3g}" for v in values))
    return proc.returncode == 0


def _iteration_metrics(path: Path) -> dict[str, list[dict]]:
    """{output: [metrics of each iteration]} from Polygraphy's --save-accuracy-results JSON."""
    metrics: dict[str, list[dict]] = {}

    def walk(node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(value, dict) and ("cosine_similarity" in value or "max_absdiff" in value):
                    metrics.setdefault(key, []).append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(json.loads(path.read_text()))
    return metrics


def run_tensorrt(package_dir: Path, manifest: dict, precision: str) -> bool | None:
    """Build a TensorRT engine (exporter.trt_engine) and compare it like ONNX Runtime; None where unavailable."""
    from dit_ops.tensorrt_probe import TensorRTUnavailable, load_tensorrt_plugins, probe

    status = probe()
    if not status.available:
        typer.echo(f"TensorRT {precision} check skipped: {status.reason}")
        return None
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.comparator import Comparator, CompareFunc, CosineSimilarityCompareFunc, RunResults
    from polygraphy.json import load_json

    from exporter.trt_engine import build_engine

    parity = manifest["parity"]
    entry = manifest["denoiser"]["precisions"][precision]
    outputs_path = package_dir / parity["outputs"].get(precision, parity["outputs"]["fp32"])
    feeds = load_json(str(package_dir / parity["inputs"]))
    batch = max(len(feed["x"]) for feed in feeds)
    with tempfile.TemporaryDirectory() as tmp:  # engines are GPU-specific: never stored in the package
        engine_path = Path(tmp) / f"denoiser.{precision}.plan"
        try:
            load_tensorrt_plugins()
            build_engine(package_dir / entry["file"], engine_path, min_batch=1, opt_batch=batch, max_batch=batch)
        except TensorRTUnavailable as err:
            typer.echo(f"TensorRT {precision} check skipped: {err}")
            return None
        engine = engine_path.read_bytes()
    tolerances = parity.get("tolerances", TOLERANCES)
    if precision == "fp16":
        compare = CosineSimilarityCompareFunc(
            cosine_similarity_threshold=tolerances.get("fp16", TOLERANCES["fp16"])["cosine_similarity"])
    else:
        ratio = tolerances.get("fp32", TOLERANCES["fp32"])["max_abs_error_over_scale"]
        compare = CompareFunc.simple(
            atol={k: ratio * v for k, v in output_scale(outputs_path).items()}, rtol=0.0, check_error_stat="max")
    typer.echo(f"== {precision}: TensorRT {status.version} vs PyTorch ({entry['file']})")
    runner = TrtRunner(EngineFromBytes(engine))
    results = Comparator.run([runner], data_loader=feeds)
    results.extend(RunResults.load(str(outputs_path)))
    return bool(Comparator.compare_accuracy(results, compare_func=compare))


app = typer.Typer(add_completion=False, help=__doc__.split("\n\n")[0])


@app.command()
def main(
    package: Path = typer.Argument(..., help="package directory written by dit-export"),
    precision: str = typer.Option("all", help="fp32, fp16 or all (every precision the package has)"),
    trt: bool = typer.Option(False, "--trt", help="also build a TensorRT engine and compare (needs TensorRT + GPU)"),
    verbose: bool = typer.Option(False, "--verbose", help="show Polygraphy's full log"),
) -> None:
    """Compare the package's ONNX denoisers with its stored PyTorch outputs; exit 1 beyond tolerance."""
    try:
        manifest = load_manifest(package)
        validate_manifest(manifest)
    except (FileNotFoundError, ValueError) as err:
        typer.echo(f"dit-parity: error: {err}", err=True)
        raise typer.Exit(2)
    available = [p for p in ("fp32", "fp16") if p in manifest["denoiser"]["precisions"]]
    if precision == "all":
        chosen = available
    elif precision in ("fp32", "fp16"):
        if precision not in available:
            raise typer.BadParameter(f"package has no {precision} denoiser; it has {', '.join(available)}",
                                     param_hint="--precision")
        chosen = [precision]
    else:
        raise typer.BadParameter(f"{precision!r}: valid choices are fp32, fp16, all", param_hint="--precision")
    if manifest.get("parity") is None:
        typer.echo("package has no parity data", err=True)
        raise typer.Exit(2)
    bad = verify_files(package, manifest)
    if bad:
        typer.echo("package files do not match manifest.json:\n  " + "\n  ".join(bad), err=True)
        raise typer.Exit(1)
    verdicts = {}
    for p in chosen:
        verdicts[f"onnxrt {p}"] = run_onnxrt(package, manifest, p, verbose)
        if trt:
            result = run_tensorrt(package, manifest, p)
            if result is not None:
                verdicts[f"tensorrt {p}"] = result
    for name, ok in verdicts.items():
        typer.echo(f"{name}: {'PASSED' if ok else 'FAILED'}")
    if not all(verdicts.values()):
        raise typer.Exit(1)
