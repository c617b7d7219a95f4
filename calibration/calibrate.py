"""Timestep-aware post-training quantization of a package's denoiser."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from calibration.collect import collect_feeds, record_step_ranges
from calibration.quantize import QUANTIZED_OP_TYPES, float_nodes, quantize_fp8, quantize_int8
from calibration.ranges import METHODS
from calibration.report import cosine, psnr_uint8, write_report
from exporter.manifest import refresh_hashes, write_json_atomic
from runtime import Sampler
from runtime.manifest import load_manifest, resolve
from runtime.sessions import Session, open_session

PRECISIONS = ("int8", "fp8")
MIN_SAMPLES = 4
FP8_NOTE = "FP8 Q/DQ runs on TensorRT (Ada/Hopper or newer); ONNX Runtime's CPU provider cannot run it."

Classifier = Callable[[np.ndarray], np.ndarray]  # uint8 images (N, H, W, C) -> predicted labels (N,)


def _check_args(package: Path, precision: str, samples: int, steps: int) -> dict:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if samples < MIN_SAMPLES:
        raise ValueError(f"--samples {samples} is too few to calibrate; use at least {MIN_SAMPLES} (32 recommended)")
    if steps < 1:
        raise ValueError(f"--steps must be at least 1, got {steps}")
    manifest = load_manifest(package)
    if "fp32" not in manifest["denoiser"]["precisions"]:
        have = ", ".join(manifest["denoiser"]["precisions"]) or "none"
        raise ValueError(f"{package} has no fp32 denoiser to calibrate (has: {have}); re-export it without --fp16-only")
    return manifest


def _quantized_session(path: Path) -> Session:
    """Opened by the runtime's own code, so the int8 model is judged exactly as the runtime will run it."""
    session, _ = open_session(path, "cpu")
    return session


def _evaluate(
    sampler: Sampler,
    quantized: Session,
    feeds: list[tuple[int, dict[str, np.ndarray]]],
    reference_images: np.ndarray,
    eval_labels: np.ndarray,
    sample_kwargs: dict,
    classifier: Classifier | None,
) -> dict:
    """Per-step output cosine on fp32-trajectory inputs, then whole-trajectory image PSNR and accuracy."""
    name = sampler._denoiser_output
    steps = max(s for s, _ in feeds) + 1
    per_step: list[list[float]] = [[] for _ in range(steps)]
    for step, feed in feeds:
        ref = sampler._denoiser.run([name], feed)[0]
        got = quantized.run([name], feed)[0]
        per_step[step].append(cosine(ref, got))
    fp32_session, sampler._denoiser = sampler._denoiser, quantized
    try:
        images = sampler(eval_labels, **sample_kwargs)
    finally:
        sampler._denoiser = fp32_session
    psnr = float(np.mean([psnr_uint8(a, b) for a, b in zip(images, reference_images)]))
    result = {"per_step_cosine": [float(np.mean(c)) for c in per_step], "psnr_db": psnr}
    if classifier is not None:
        result["class_accuracy"] = float(np.mean(classifier(images) == eval_labels))
    return result


def calibrate(
    package: str | Path,
    precision: str = "int8",
    *,
    samples: int = 32,
    steps: int = 20,
    scheduler: str = "dpm++2m",
    guidance_scale: float = 4.0,
    method: str = "minmax",
    percentile: float = 1.0,
    batch_size: int = 8,
    eval_samples: int = 16,
    seed: int = 0,
    classifier: Classifier | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Quantize the fp32 denoiser of `package`, add it to the manifest and return the report."""
    package = Path(package)
    manifest = _check_args(package, precision, samples, steps)
    if method not in METHODS:
        raise ValueError(f"unknown range method {method!r}; valid: {', '.join(METHODS)}")
    fp32_entry = manifest["denoiser"]["precisions"]["fp32"]
    fp32_path = resolve(package, fp32_entry["file"])
    sampler = Sampler(package, precision="fp32")
    rng = np.random.default_rng(seed)
    num_classes = manifest["classes"]["num_classes"]
    sample_kwargs = {"steps": steps, "scheduler": scheduler, "guidance_scale": guidance_scale}

    started = time.perf_counter()
    labels = rng.integers(0, num_classes, samples)
    log(f"collecting denoiser inputs: {samples} samples x {steps} steps ({scheduler})")
    feeds = collect_feeds(sampler, labels, batch_size=batch_size, seed=seed, **sample_kwargs)
    log(f"recording activation ranges over {len(feeds)} denoiser calls")
    ranges = record_step_ranges(fp32_path, feeds, steps, QUANTIZED_OP_TYPES)
    exclude = float_nodes(onnx.load(str(fp32_path), load_external_data=False))

    eval_labels = np.arange(eval_samples) % num_classes
    eval_seed = seed + 1_000_003  # evaluation trajectories are not the calibration ones
    eval_feeds = collect_feeds(sampler, eval_labels[:batch_size], batch_size=batch_size, seed=eval_seed,
                               **sample_kwargs)
    reference_images = sampler(eval_labels, seed=eval_seed, **sample_kwargs)
    report = {
        "package": str(package), "precision": precision, "samples": samples, "steps": steps,
        "scheduler": scheduler, "guidance_scale": guidance_scale, "range_method": method,
        "percentile": percentile, "eval_samples": eval_samples, "float_nodes": len(exclude),
        "methods": {},
    }
    if classifier is not None:
        report["fp32_class_accuracy"] = float(np.mean(classifier(reference_images) == eval_labels))

    out_name = f"denoiser.{precision}.onnx"
    with tempfile.TemporaryDirectory(prefix="dit-edge-quant.", dir=package) as tmp:
        chosen = Path(tmp) / out_name
        if precision == "fp8":
            report["quantized_nodes"] = quantize_fp8(fp32_path, chosen, ranges.aggregate(method, percentile),
                                                     exclude=exclude)
            report["methods"][method] = {"note": FP8_NOTE}
        else:
            # The chosen method is written; the other is measured too so the report shows what it buys.
            for m in (method, *[x for x in METHODS if x != method]):
                path = chosen if m == method else Path(tmp) / f"{m}.onnx"
                quantize_int8(fp32_path, path, ranges.aggregate(m, percentile), exclude=exclude)
                log(f"evaluating int8 ({m} ranges)")
                report["methods"][m] = _evaluate(sampler, _quantized_session(path), eval_feeds,
                                                 reference_images, eval_labels,
                                                 {**sample_kwargs, "seed": eval_seed}, classifier)
            report["quantized_nodes"] = sum(
                n.op_type == "DequantizeLinear" for n in onnx.load(str(chosen), load_external_data=False).graph.node
            ) // 2
        shutil.move(str(chosen), package / out_name)

    report["seconds"] = round(time.perf_counter() - started, 1)
    entry = {
        "file": out_name,
        "sha256": "",
        "inputs": fp32_entry["inputs"],
        "outputs": fp32_entry["outputs"],
        "calibration": {k: report[k] for k in ("samples", "steps", "scheduler", "range_method", "percentile")},
    }
    if precision == "fp8":
        entry["runnable_on"] = ["tensorrt"]
        entry["note"] = FP8_NOTE
    manifest["denoiser"]["precisions"][precision] = entry
    json_path, md_path = write_report(package / f"calibration_{precision}", report)
    write_json_atomic(package / "manifest.json", refresh_hashes(package, manifest))
    log(f"wrote {package / out_name}, {json_path.name}, {md_path.name} in {report['seconds']} s")
    return report


def load_report(package: str | Path, precision: str = "int8") -> dict:
    return json.loads((Path(package) / f"calibration_{precision}.json").read_text())
