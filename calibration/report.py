"""Quality report of a quantized denoiser against fp32: per-step cosine, final-image PSNR, class accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    denom = np.linalg.norm(a64) * np.linalg.norm(b64)
    return float(a64 @ b64 / denom) if denom > 0 else float(np.array_equal(a64, b64))


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def write_report(path_stem: Path, report: dict) -> tuple[Path, Path]:
    """Write `<stem>.json` and a readable `<stem>.md`."""
    json_path, md_path = path_stem.with_suffix(".json"), path_stem.with_suffix(".md")
    json_path.write_text(json.dumps(report, indent=2))
    lines = [
        f"# Calibration report: {report['precision']}",
        "",
        f"Package `{report['package']}`, {report['samples']} calibration samples x {report['steps']} steps "
        f"({report['scheduler']}, guidance {report['guidance_scale']}), ranges: `{report['range_method']}` "
        f"(percentile {report['percentile']}), {report['quantized_nodes']} quantized nodes, "
        f"{report['float_nodes']} kept in float.",
        "",
    ]
    for method, res in report["methods"].items():
        if "per_step_cosine" not in res:
            continue
        cos = res["per_step_cosine"]
        lines += [
            f"## Ranges `{method}`",
            "",
            f"- denoiser output cosine vs fp32: min {min(cos):.5f}, mean {np.mean(cos):.5f}",
            f"- final-image PSNR vs fp32: {res['psnr_db']:.2f} dB (mean over {report['eval_samples']} samples)",
        ]
        if res.get("class_accuracy") is not None:
            lines.append(
                f"- class accuracy: {100 * res['class_accuracy']:.1f}% (fp32 {100 * report['fp32_class_accuracy']:.1f}%)"
            )
        lines += ["", "| step | cosine |", "|---:|---:|"]
        lines += [f"| {i} | {c:.5f} |" for i, c in enumerate(cos)]
        lines.append("")
    md_path.write_text("\n".join(lines))
    return json_path, md_path
