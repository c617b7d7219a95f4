"""The deployable packages the benchmarks measure, made by the project's own tools and kept in the work dir.

`dit-export --model NAME --fp16` (random weights: speed does not depend on them) gives the fp32 and fp16
denoisers; the calibration package adds int8. A package already in the work dir is reused, with the
export time recorded when it was made, so `--workdir` lets a second run skip the exports.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.harness import Settings, ok, run_process

_FAILED: dict[str, dict] = {}


def dit_export_command() -> list[str]:
    """The installed `dit-export` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("dit-export")
    if not script.exists():
        return []
    return [str(script)]


def read_manifest(package: Path) -> dict:
    return json.loads((package / "manifest.json").read_text())


def export_package(settings: Settings, model: str, fp16: bool = True, extra: tuple[str, ...] = ()) -> dict:
    """`dit-export --model model [--fp16] ...` into the work dir; returns status, path, wall time, peak RSS."""
    key = model + ("_fp16" if fp16 else "_fp32") + "".join(extra).replace("-", "_")
    package = settings.workdir / "packages" / key
    record = package / "benchmark_export.json"
    if record.exists() and (package / "manifest.json").exists():
        return json.loads(record.read_text())
    if str(package) in _FAILED:  # a failed export is not retried within one run
        return _FAILED[str(package)]
    command = dit_export_command()
    if not command:
        return {"status": "unavailable: the dit-export console script is not installed (pip install -e .)"}
    argv = [*command, "--model", model, "--out", str(package), "--force", *(["--fp16"] if fp16 else []), *extra]
    result = run_process(argv, settings, label=f"export_{key}")
    row = {"status": result["status"] if result["status"] == "ok" else f"unavailable: dit-export {result['status']}",
           "command": " ".join(["dit-export", *argv[len(command):]]), "path": str(package),
           "wall_s": result["wall_s"], "cpu_s": result["cpu_s"], "peak_rss_mb": result["peak_rss_mb"]}
    if ok(row):
        if not (package / "manifest.json").exists():
            row["status"] = "unavailable: dit-export wrote no manifest.json"
        else:
            row["precisions"] = sorted(read_manifest(package)["denoiser"]["precisions"])
            record.write_text(json.dumps(row))
    if not ok(row):
        _FAILED[str(package)] = row
    return row


def calibrate_int8(settings: Settings, package: Path, label: str) -> dict:
    """`python -m calibration PACKAGE --precision int8` with few samples: the benchmarks time int8, the
    calibration report (not this run) judges its quality. Returns status, command, wall/CPU time, peak RSS."""
    samples, steps = (4, 2) if settings.quick else (4, 4)
    argv = [sys.executable, "-m", "calibration", str(package), "--precision", "int8", "--samples", str(samples),
            "--steps", str(steps), "--eval-samples", str(samples)]
    result = run_process(argv, settings, label=label)
    return {"status": "ok" if result["status"] == "ok" else f"unavailable: calibration {result['status']}",
            "command": "python -m calibration " + " ".join(argv[3:]), "wall_s": result["wall_s"],
            "cpu_s": result["cpu_s"], "peak_rss_mb": result["peak_rss_mb"]}


def package_with(settings: Settings, model: str, precisions: tuple[str, ...]) -> tuple[dict[str, Path], dict]:
    """Paths of packages holding each wanted precision (fp32, fp16, int8) of `model`; plus the export rows.

    One `--fp16` export normally carries fp32 and fp16; when it does not, fp32 is exported on its own.
    int8 is calibrated into the package that holds fp32.
    """
    found: dict[str, Path] = {}
    exports = {"fp16": export_package(settings, model, fp16=True)}
    if ok(exports["fp16"]):
        for precision in exports["fp16"]["precisions"]:
            found[precision] = Path(exports["fp16"]["path"])
    if "fp32" not in found:
        exports["fp32"] = export_package(settings, model, fp16=False)
        if ok(exports["fp32"]):
            found["fp32"] = Path(exports["fp32"]["path"])
    if "int8" in precisions and "fp32" in found:
        package = found["fp32"]
        if "int8" not in read_manifest(package)["denoiser"]["precisions"]:
            exports["int8"] = calibrate_int8(settings, package, label=f"calibrate_{model}")
        if "int8" in read_manifest(package)["denoiser"]["precisions"]:
            found["int8"] = package
    return {p: found[p] for p in precisions if p in found}, exports
