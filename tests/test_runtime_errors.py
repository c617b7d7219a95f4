"""Bad input to the runtime fails early with an error that names the problem and the valid choices."""

import json
import shutil
import sys
import types
import warnings

import numpy as np
import pytest

import runtime
from runtime import PackageError, ProviderUnavailable, Sampler
from tests.runtime_fixtures import build_package, rewrite_manifest


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return build_package(tmp_path_factory.mktemp("pristine"))[0]


@pytest.fixture(scope="module")
def sampler(pristine):
    return Sampler(pristine)


@pytest.fixture
def package(pristine, tmp_path):
    """A private copy to break."""
    return shutil.copytree(pristine, tmp_path / "package")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(class_labels=[3, 11]), ValueError, r"\[11\] out of range: valid labels are 0\.\.9, or 10 \(the null"),
        (dict(class_labels=[-1]), ValueError, r"valid labels are 0\.\.9"),
        (dict(class_labels=[1.5]), ValueError, "integer"),
        (dict(class_labels=[]), ValueError, "non-empty"),
        (dict(class_labels=[1], steps=0), ValueError, "between 1 and num_train_timesteps=1000"),
        (dict(class_labels=[1], steps=1001), ValueError, "between 1 and num_train_timesteps=1000"),
        (dict(class_labels=[1], scheduler="plms"), ValueError, r"valid choices: ddpm, ddim, dpm\+\+2m, euler"),
        (dict(class_labels=[1], scheduler="euler", eta=0.3), ValueError, "only applies to the 'ddim'"),
        (dict(class_labels=[1, 2], seed=[1]), ValueError, "got 1 seeds for 2 class labels"),
        (dict(class_labels=[1], seed=-4), ValueError, "non-negative"),
        (dict(class_labels=[1], latents=np.zeros((1, 4, 4, 4))), ValueError, r"shape \(1, 4, 8, 8\)"),
        (dict(class_labels=[1], cfg_channels=5), ValueError, r"'all' or an integer in 1\.\.4"),
        (dict(class_labels=[1], output_type="pil"), ValueError, "valid choices: uint8, latent"),
        (dict(class_labels=[1], guidance_scale=float("nan")), ValueError, "finite"),
    ],
)
def test_bad_call_arguments(sampler, kwargs, error, message):
    with pytest.raises(error, match=message):
        sampler(**kwargs)


def test_unknown_provider_and_precision(pristine):
    with pytest.raises(ValueError, match="valid choices: cpu, cuda, tensorrt"):
        Sampler(pristine, provider="rocm")
    with pytest.raises(ValueError, match="precision 'fp16' is not in this package; available: fp32"):
        Sampler(pristine, precision="fp16")
    with pytest.raises(ValueError, match="threads must be >= 1"):
        Sampler(pristine, threads=0)


def test_missing_package_or_manifest(tmp_path):
    with pytest.raises(PackageError, match="does not exist"):
        Sampler(tmp_path / "nowhere")
    with pytest.raises(PackageError, match="manifest.json is missing"):
        Sampler(tmp_path)


def test_schema_version_mismatch(package):
    rewrite_manifest(package, schema_version=2)
    with pytest.raises(PackageError, match="schema_version 2 is not supported: this runtime reads schema 1"):
        Sampler(package)


def test_missing_required_key(package):
    rewrite_manifest(package, classes=None, cfg=None)
    with pytest.raises(PackageError, match="missing required keys: classes, cfg"):
        Sampler(package)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(latent={"channels": 4, "height": 0, "width": 8}), "latent.height must be a positive integer"),
        (dict(cfg={"channels": "some"}), "cfg.channels must be a positive integer or 'all'"),
        (dict(learn_sigma="yes"), "learn_sigma must be true or false"),
        (dict(denoiser={"precisions": {}}), "at least one precision"),
        (dict(files={"../outside.onnx": "00"}), "must be relative and inside the package directory"),
    ],
)
def test_malformed_manifest(package, change, message):
    rewrite_manifest(package, **change)
    with pytest.raises(PackageError, match=message):
        Sampler(package)


def test_missing_file_is_named(package):
    (package / "vae_decoder.onnx").unlink()
    with pytest.raises(PackageError, match="'vae_decoder.onnx' listed in the manifest is missing"):
        Sampler(package)


def test_tampered_file_is_named(package):
    with open(package / "denoiser.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(PackageError, match="'denoiser.onnx' failed its sha256 check"):
        Sampler(package)


def test_conflicting_hashes_are_refused(package):
    manifest = json.loads((package / "manifest.json").read_text())
    manifest["files"]["denoiser.onnx"] = "0" * 64
    (package / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match="two different sha256 values for 'denoiser.onnx'"):
        Sampler(package)


def test_unavailable_cuda_falls_back_or_fails_when_strict(pristine):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA; the fallback path cannot be exercised")
    with pytest.warns(RuntimeWarning, match="provider 'cuda' is unavailable.*falling back to the CPU provider"):
        fallback = Sampler(pristine, provider="cuda")
    assert fallback.provider == "cpu"
    assert fallback([1], steps=2, scheduler="ddim").shape == (1, 16, 16, 3)
    with pytest.raises(ProviderUnavailable, match="CUDAExecutionProvider"):
        Sampler(pristine, provider="cuda", strict=True)


def test_unavailable_tensorrt_falls_back_or_fails_when_strict(pristine, monkeypatch):
    broken = types.ModuleType("runtime.tensorrt_session")

    def open_session(path):
        raise ImportError("No module named 'tensorrt'")

    broken.open_session = open_session
    monkeypatch.setitem(sys.modules, "runtime.tensorrt_session", broken)
    monkeypatch.setattr(runtime, "tensorrt_session", broken, raising=False)
    with pytest.warns(RuntimeWarning, match="provider 'tensorrt' is unavailable: No module named 'tensorrt'"):
        assert Sampler(pristine, provider="tensorrt").provider == "cpu"
    with pytest.raises(ProviderUnavailable, match="tensorrt"):
        Sampler(pristine, provider="tensorrt", strict=True)


def test_cpu_provider_gives_no_warning(pristine):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Sampler(pristine).provider == "cpu"


def test_output_channels_must_match_the_manifest(package):
    rewrite_manifest(package, learn_sigma=False)
    with pytest.raises(RuntimeError, match="implies 4 output channels"):
        Sampler(package)([1], steps=2, scheduler="ddim")
