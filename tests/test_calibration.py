"""calibration/: timestep-aware ranges, symmetric INT8 / FP8 Q/DQ denoisers, manifest update, report, bad input."""

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper

import models
from calibration.calibrate import calibrate
from calibration.quantize import FLOAT_SCOPES, module_path
from calibration.ranges import StepRanges
from exporter.sources import load_source
from exporter.package import ExportOptions, export_package
from runtime import Sampler

STEPS = 4


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    """A tiny DiT with CLEAR local attention and non-trivial (perturbed) weights, exported at fp32."""
    root = tmp_path_factory.mktemp("calib")
    torch.manual_seed(0)
    model = models.create_model("dit_tiny_2", input_size=8)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    torch.save(model.state_dict(), root / "weights.pt")
    source = load_source(model="dit_tiny_2", checkpoint=None, official=root / "weights.pt", diffusers=None,
                         latent_size=8, attention="local", radius=3, down_factor=None, seed=0)
    export_package(source, root / "pkg", ExportOptions(), force=False)
    return root / "pkg"


@pytest.fixture(scope="module")
def int8_package(package, tmp_path_factory) -> tuple[Path, dict]:
    target = tmp_path_factory.mktemp("int8") / "pkg"
    shutil.copytree(package, target)
    report = calibrate(target, "int8", samples=4, steps=STEPS, batch_size=4, eval_samples=2, log=lambda _: None)
    return target, report


def test_timestep_aggregation_takes_min_of_step_means():
    ranges = StepRanges(num_steps=4)
    for step, values in enumerate([[8.0, 10.0], [4.0, 6.0], [2.0, 2.0], [30.0, 30.0]]):
        for v in values:
            ranges.record(step, {"a": v})
    np.testing.assert_allclose(ranges.per_step_mean("a"), [9.0, 5.0, 2.0, 30.0])
    assert ranges.aggregate("timestep", 1.0)["a"] == 2.0
    assert ranges.aggregate("timestep", 0.5)["a"] == 5.0  # first 2 of 4 steps
    assert ranges.aggregate("minmax")["a"] == 30.0
    with pytest.raises(ValueError, match="valid: minmax, timestep"):
        ranges.aggregate("entropy")
    with pytest.raises(ValueError, match="no data for steps"):
        StepRanges(num_steps=2, amax={"b": {0: [1.0]}}).per_step_mean("b")


def test_int8_is_symmetric_per_channel_and_keeps_sensitive_layers_float(int8_package):
    path, _ = int8_package
    model = onnx.load(str(path / "denoiser.int8.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq, "no Q/DQ nodes written"
    zero_points = [inits[n.input[2]] for n in qdq if len(n.input) > 2]
    assert zero_points and all(np.all(z == 0) and z.dtype == np.int8 for z in zero_points)
    per_channel = [n for n in qdq if n.op_type == "DequantizeLinear" and inits.get(n.input[1], np.zeros(1)).size > 1]
    assert per_channel, "weights are not quantized per channel"
    dequantized = {n.output[0] for n in qdq if n.op_type == "DequantizeLinear"}
    matmuls = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Conv")]
    kept_float = [n for n in matmuls if any(s in module_path(n) for s in FLOAT_SCOPES)]
    quantized = [n for n in matmuls if n.input[0] in dequantized]
    assert kept_float and quantized
    assert not any(n.input[0] in dequantized for n in kept_float)
    custom = [n for n in model.graph.node if n.domain == "dit_ops"]
    assert len(custom) == 4 and {f.name for f in model.functions} == {"LocalWindowAttention"}
    assert not any(n.input[0] in dequantized or n.output[0] in dequantized for n in custom)


def test_int8_matches_fp32_and_runs_through_sampler(int8_package):
    path, report = int8_package
    manifest = json.loads((path / "manifest.json").read_text())
    entry = manifest["denoiser"]["precisions"]["int8"]
    assert entry["file"] == "denoiser.int8.onnx" and manifest["files"][entry["file"]] == entry["sha256"]
    rng = np.random.default_rng(0)
    feed = {"x": rng.standard_normal((2, 4, 8, 8), dtype=np.float32), "t": np.array([999.0, 3.0], np.float32),
            "y": np.array([7, 1000], np.int64)}
    fp32 = ort.InferenceSession(str(path / "denoiser.onnx")).run(None, feed)[0]
    int8 = ort.InferenceSession(str(path / "denoiser.int8.onnx")).run(None, feed)[0]
    cos = float((fp32 * int8).sum() / np.linalg.norm(fp32) / np.linalg.norm(int8))
    assert cos > 0.99
    assert not np.array_equal(fp32, int8)  # really quantized
    images = Sampler(path, precision="int8")([1, 2], steps=3, scheduler="ddim")
    assert images.dtype == np.uint8 and images.shape[0] == 2
    for method in ("timestep", "minmax"):
        cosines = report["methods"][method]["per_step_cosine"]
        assert len(cosines) == STEPS and min(cosines) > 0.99
        assert report["methods"][method]["psnr_db"] > 20
    assert (path / "calibration_int8.md").read_text().startswith("# Calibration report: int8")


def test_fp8_is_structurally_valid_and_refused_by_onnx_runtime(package, tmp_path):
    target = tmp_path / "pkg"
    shutil.copytree(package, target)
    calibrate(target, "fp8", samples=4, steps=2, batch_size=4, eval_samples=2, log=lambda _: None)
    model = onnx.load(str(target / "denoiser.fp8.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 19
    fp8_zero_points = [i for i in model.graph.initializer if i.data_type == TensorProto.FLOAT8E4M3FN]
    assert fp8_zero_points
    entry = json.loads((target / "manifest.json").read_text())["denoiser"]["precisions"]["fp8"]
    assert entry["runnable_on"] == ["tensorrt"]
    with pytest.raises(ValueError, match="runs only on provider tensorrt"):
        Sampler(target, precision="fp8")


def test_bad_input(package, tmp_path):
    with pytest.raises(ValueError, match="valid: int8, fp8"):
        calibrate(package, "int4")
    with pytest.raises(ValueError, match="too few"):
        calibrate(package, "int8", samples=1)
    no_fp32 = tmp_path / "pkg"
    shutil.copytree(package, no_fp32)
    manifest = json.loads((no_fp32 / "manifest.json").read_text())
    manifest["denoiser"]["precisions"]["fp16"] = manifest["denoiser"]["precisions"].pop("fp32")
    (no_fp32 / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="no fp32 denoiser"):
        calibrate(no_fp32, "int8")
    cli = subprocess.run([sys.executable, "-m", "calibration", str(package), "--precision", "int3"],
                         capture_output=True, text=True)
    assert cli.returncode == 2 and "valid: int8, fp8" in cli.stderr


def test_quantizer_preprocess_advice_is_dropped_and_only_it(package, tmp_path, caplog):
    target = tmp_path / "pkg"
    shutil.copytree(package, target)
    with caplog.at_level(logging.WARNING):
        calibrate(target, "int8", samples=4, steps=2, batch_size=4, eval_samples=1, log=lambda _: None)
        assert not [r for r in caplog.records if "pre-process" in r.getMessage()]
        logging.getLogger().warning("Please consider to run pre-processing before quantization.")
    assert [r for r in caplog.records if "pre-process" in r.getMessage()]  # the filter left with the call
