"""`dit-export` and `dit-parity` end to end: random weights, a train-style checkpoint (local attention + VAE),
parity passing on a fresh package and failing on a corrupted one, and the bad-input errors."""
import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file
from typer.testing import CliRunner

import models
from exporter.cli import app as export_app
from exporter.manifest import load_manifest, refresh_hashes, validate_manifest, write_json_atomic
from exporter.parity import app as parity_app
from exporter.vae import DecodeToImage

runner = CliRunner()
pytestmark = pytest.mark.slow


def export(*args: str):
    return runner.invoke(export_app, [str(a) for a in args])


@pytest.fixture(scope="module")
def random_package(tmp_path_factory):
    out = tmp_path_factory.mktemp("random") / "pkg"
    with pytest.warns(UserWarning, match="RANDOM weights"):
        result = export("--model", "dit_tiny_2", "--latent-size", 8, "--fp16", "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_random_export_package_layout(random_package):
    manifest = load_manifest(random_package)
    validate_manifest(manifest)
    assert manifest["model"]["name"] == "dit_tiny_2" and manifest["model"]["source"]["kind"] == "random"
    assert manifest["latent"] == {"channels": 4, "height": 8, "width": 8}
    assert manifest["denoiser"]["batch"] == "dynamic"
    assert manifest["parity"]["outputs"] == {"fp32": "parity/torch_outputs.json", "fp16": "parity/torch_outputs.json"}
    inputs = json.loads((random_package / "parity/inputs.json").read_text())
    assert len(inputs) >= 4  # Polygraphy's List[Dict[str, ndarray]] JSON


def test_parity_passes_on_fresh_export(random_package):
    result = runner.invoke(parity_app, [str(random_package)])
    assert result.exit_code == 0, result.output
    assert "onnxrt fp32: PASSED" in result.output and "onnxrt fp16: PASSED" in result.output
    assert "Absolute Difference" in result.output and "Cosine Similarity" in result.output


def test_parity_fails_on_corrupted_weights(random_package, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(random_package, bad)
    rng = np.random.default_rng(0)
    for name, delta in (("denoiser.onnx", 1e-2), ("denoiser.fp16.onnx", 0.5)):  # relative weight noise
        model = onnx.load(str(bad / name))
        for tensor in model.graph.initializer:
            array = onnx.numpy_helper.to_array(tensor)
            if array.dtype.kind == "f" and array.size > 1:
                noisy = array * (1 + delta * rng.standard_normal(array.shape))
                tensor.CopyFrom(onnx.numpy_helper.from_array(noisy.astype(array.dtype), tensor.name))
        onnx.save(model, str(bad / name))
    # untouched hashes: refused before any comparison
    result = runner.invoke(parity_app, [str(bad)])
    assert result.exit_code == 1 and "sha256 mismatch" in result.output
    manifest = refresh_hashes(bad, load_manifest(bad))
    write_json_atomic(bad / "manifest.json", manifest)
    for precision in ("fp32", "fp16"):
        result = runner.invoke(parity_app, [str(bad), "--precision", precision])
        assert result.exit_code == 1, result.output
        assert f"onnxrt {precision}: FAILED" in result.output


def test_parity_rejects_unknown_precision(random_package):
    result = runner.invoke(parity_app, [str(random_package), "--precision", "int4"])
    assert result.exit_code != 0 and "valid choices are fp32, fp16, all" in result.output


def test_parity_trt_without_tensorrt_says_why(random_package):
    result = runner.invoke(parity_app, [str(random_package), "--precision", "fp32", "--trt"])
    assert result.exit_code == 0, result.output
    assert "TensorRT fp32 check skipped" in result.output or "tensorrt fp32: PASSED" in result.output


def _tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=[8, 16], norm_num_groups=4, latent_channels=4, layers_per_block=1,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2).eval()


KWARGS = dict(input_size=8, depth=1, hidden_size=32, num_heads=2, num_classes=10)


def _write_checkpoint(path, state, vae=None, attention=None):
    path.mkdir()
    config = {
        "format": "dit-edge-checkpoint", "version": 1, "model": {"name": "dit_tiny_2", "kwargs": KWARGS},
        "attention": attention or {"kind": "full"},
        "diffusion": {"num_timesteps": 1000, "beta_schedule": "linear", "learn_sigma": True},
        "vae": {"kind": "none"} if vae is None else {"kind": "diffusers", "path": "vae", "scaling_factor": 0.5,
                                                     "image_size": 16, "image_channels": 3},
        "data": {}, "cfg_channels": 3,
    }
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    if vae is not None:
        vae.save_pretrained(path / "vae")
    return path


def test_local_attention_checkpoint_with_vae(tmp_path):
    torch.manual_seed(1)
    model = models.linearize(models.create_model("dit_tiny_2", **KWARGS), radius=2, down_factor=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    vae = _tiny_vae()
    ckpt = _write_checkpoint(tmp_path / "ckpt", model.state_dict(), vae,
                             {"kind": "local", "radius": 2, "down_factor": 2})
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0.0, 500.0, 999.0]), torch.tensor([1, 10, 3])
    latent = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        ref = model.eval()(x, t, y).numpy()
        image = DecodeToImage(vae, 0.5)(latent).numpy()

    result = export("--checkpoint", ckpt, "--out", tmp_path / "pkg")  # local without --attention
    assert result.exit_code == 0, result.output
    manifest = load_manifest(tmp_path / "pkg")
    assert manifest["model"]["attention"] == {"kind": "local", "radius": 2, "down_factor": 2}
    assert manifest["custom_ops"][0]["name"] == "LocalWindowAttention" and manifest["custom_ops"][0]["count"] == 1
    assert manifest["classes"] == {"num_classes": 10, "null_label": 10}
    assert manifest["image"] == {"channels": 3, "height": 16, "width": 16, "range": [0, 1]}
    assert manifest["vae_decoder"]["scaling_factor"] == 0.5 and manifest["space"] == "latent"

    got = ort.InferenceSession(str(tmp_path / "pkg/denoiser.onnx")).run(
        None, {"x": x.numpy(), "t": t.numpy(), "y": y.numpy()})[0]
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    decoded = ort.InferenceSession(str(tmp_path / "pkg/vae_decoder.onnx")).run(None, {"latent": latent.numpy()})[0]
    assert decoded.shape == (2, 3, 16, 16) and decoded.min() >= 0 and decoded.max() <= 1
    np.testing.assert_allclose(decoded, image, atol=1e-5)

    # --force replaces the package; --vae none drops the decoder
    result = export("--checkpoint", ckpt, "--out", tmp_path / "pkg", "--vae", "none", "--force")
    assert result.exit_code == 0, result.output
    manifest = load_manifest(tmp_path / "pkg")
    assert manifest["vae_decoder"] is None and not (tmp_path / "pkg/vae_decoder.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "pkg"]  # no staging leftovers


def test_console_shows_the_steps_and_no_library_noise(tmp_path):
    """A user sees each step with its time, and not onnxscript's pass logs, Polygraphy's missing-`colored` notice,
    diffusers' `accelerate` advice or torch's internal deprecation warnings."""
    model = models.create_model("dit_tiny_2", **KWARGS)
    ckpt = _write_checkpoint(tmp_path / "ckpt", model.state_dict(), _tiny_vae())
    proc = subprocess.run([sys.executable, "-m", "exporter.cli", "--checkpoint", str(ckpt), "--out", str(tmp_path / "pkg")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    steps = [line.removeprefix("INFO exporter.package: ") for line in proc.stderr.splitlines()]
    for step in ("parity references", "denoiser dit_tiny_2: torch.onnx export", "VAE decoder"):
        assert any(line.startswith(step) and line.endswith(" s") for line in steps), proc.stderr
    console = proc.stdout + proc.stderr
    for noise in ("onnx_ir", "onnxscript", "colored", "accelerate", "Warning", "Saving"):
        assert noise not in console, console
    assert proc.stdout.startswith(f"wrote {tmp_path / 'pkg'}: fp32 denoiser (dit_tiny_2")


@pytest.fixture
def mismatched_checkpoint(tmp_path):
    other = models.create_model("dit_tiny_2", **{**KWARGS, "hidden_size": 64})
    return _write_checkpoint(tmp_path / "ckpt", other.state_dict())


def test_checkpoint_that_does_not_fit_its_config_names_the_keys(mismatched_checkpoint, tmp_path):
    result = export("--checkpoint", mismatched_checkpoint, "--out", tmp_path / "pkg")
    assert result.exit_code == 2
    assert "shape mismatches" in result.output and "x_embedder.proj.weight" in result.output


def test_checkpoint_for_another_model_names_the_keys(tmp_path):
    ckpt = _write_checkpoint(tmp_path / "ckpt", models.create_model("dit_tiny_2", **KWARGS).state_dict())
    result = export("--checkpoint", ckpt, "--model", "udit_tiny", "--out", tmp_path / "pkg")
    assert result.exit_code == 2
    assert "missing keys" in result.output and "decoder_level_1.0.attn1.to_qkv.weight" in result.output
    assert "unexpected keys" in result.output and "blocks.0.attn.qkv.weight" in result.output


@pytest.mark.parametrize("args, message", [
    (["--model", "dit_huge_2"], "valid names: dit_s_2"),
    (["--model", "dit_tiny_2", "--latent-size", "7"], "divisible by the patch size"),
    (["--model", "udit_tiny", "--latent-size", "12"], "divisible by 8"),
    (["--model", "dit_tiny_2", "--opset", "12"], "valid range is 18.."),
    (["--model", "dit_tiny_2", "--batch", "ragged"], "valid choices are dynamic, static"),
    (["--model", "dit_tiny_2", "--attention", "local"], "needs --window-radius"),
    (["--model", "dit_tiny_2", "--attention", "sparse", "--window-radius", "2"], "valid choices: full, local"),
    (["--official", "x.pt"], "--official needs --model"),
])
def test_bad_input_is_named(args, message, tmp_path):
    result = export(*args, "--out", tmp_path / "pkg")
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "pkg").exists()


def test_existing_out_dir_needs_force(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "keep.txt").write_text("x")
    result = export("--model", "dit_tiny_2", "--out", tmp_path / "pkg")
    assert result.exit_code == 2 and "pass --force" in result.output
    assert (tmp_path / "pkg" / "keep.txt").exists()


def test_pixel_space_checkpoint_and_latent_size_rules(tmp_path):
    from exporter import sources

    dit = models.create_model("dit_tiny_2", **KWARGS)
    ckpt = _write_checkpoint(tmp_path / "dit", dit.state_dict())  # vae kind "none": a pixel-space model
    source = sources.from_checkpoint(ckpt)
    assert source.pixel_space and source.vae is None and source.origin["kind"] == "checkpoint"
    with pytest.raises(ValueError, match="position table"):
        sources.from_checkpoint(ckpt, latent_size=16)

    udit_kwargs = dict(input_size=16, depth=[1, 1, 1, 1, 1], hidden_size=16, num_heads=2, num_classes=10)
    udit = models.create_model("udit_tiny", **udit_kwargs)
    with torch.no_grad():
        for p in udit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path / "udit"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "format": "dit-edge-checkpoint", "version": 1, "model": {"name": "udit_tiny", "kwargs": udit_kwargs},
        "vae": {"kind": "none"}}))
    save_file(udit.state_dict(), str(path / "model.safetensors"))
    source = sources.from_checkpoint(path, latent_size=32)  # U-DiT has no fixed position table
    assert source.latent == (4, 32, 32) and source.config["reparameterized"] is True
    x, t, y = torch.randn(2, 4, 32, 32), torch.tensor([10.0, 990.0]), torch.tensor([2, 10])
    with torch.no_grad():
        torch.testing.assert_close(source.model(x, t, y), udit.eval()(x, t, y), atol=2e-5, rtol=1e-4)


def test_static_batch_export_and_parity(tmp_path):
    from exporter import sources
    from exporter.package import ExportOptions, export_package

    with pytest.warns(UserWarning, match="RANDOM weights"):
        source = sources.from_random("dit_tiny_2", latent_size=8, overrides=dict(depth=1, hidden_size=32, num_heads=2))
    manifest = export_package(source, tmp_path / "pkg", ExportOptions(dynamic_batch=False, batch_size=1))
    assert manifest["denoiser"]["batch"] == 1
    assert manifest["denoiser"]["precisions"]["fp32"]["inputs"][0]["shape"] == [1, 4, 8, 8]
    result = runner.invoke(parity_app, [str(tmp_path / "pkg")])
    assert result.exit_code == 0, result.output
    assert "Passed: 8/8 iterations" in result.output
