"""Manifest schema 1 validator, hashing, atomic JSON writes and the external-data (2 GB) save path."""
import copy
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporter import onnx_io
from exporter.manifest import (hash_files, refresh_hashes, sha256_file, validate_manifest, verify_files,
                               write_json_atomic)

SHA = "0" * 64
IO = {"inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 4, 8, 8]},
                 {"name": "t", "dtype": "float32", "shape": ["batch"]},
                 {"name": "y", "dtype": "int64", "shape": ["batch"]}],
      "outputs": [{"name": "out", "dtype": "float32", "shape": ["batch", 8, 8, 8]}]}


def good_manifest() -> dict:
    return {
        "schema_version": 1,
        "model": {"name": "udit_tiny", "config": {"hidden_size": 32}, "family": "udit",
                  "attention": {"kind": "local", "radius": 4, "down_factor": 0}, "reparameterized": True},
        "latent": {"channels": 4, "height": 8, "width": 8},
        "image": {"channels": 3, "height": 64, "width": 64, "range": [0, 1]},
        "classes": {"num_classes": 10, "null_label": 10},
        "learn_sigma": True,
        "diffusion": {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"},
        "cfg": {"channels": 3},
        "denoiser": {"precisions": {"fp32": {"file": "denoiser.onnx", "sha256": SHA, **IO},
                                    "fp16": {"file": "denoiser.fp16.onnx", "sha256": SHA, **IO}}},
        "vae_decoder": {"file": "vae_decoder.onnx", "sha256": SHA, "input": "latent", "output": "image",
                        "scaling_factor": 0.18215, "output_range": [0, 1]},
        "custom_ops": [{"domain": "dit_ops", "name": "LocalWindowAttention", "version": 1, "count": 10}],
        "files": {"denoiser.onnx": SHA, "denoiser.fp16.onnx": SHA, "vae_decoder.onnx": SHA,
                  "parity/inputs.json": SHA, "parity/torch_outputs.json": SHA},
        "exporter": {"dit_edge": "0.1.0", "torch": "2.13.0", "onnx": "1.23.2", "onnxscript": "0.7.2", "opset": 20},
        "parity": {"inputs": "parity/inputs.json", "outputs": {"fp32": "parity/torch_outputs.json"},
                   "tolerances": {}},
    }


def test_good_manifest_validates():
    validate_manifest(good_manifest())
    pixel = good_manifest()
    pixel["vae_decoder"] = None
    pixel["cfg"]["channels"] = "all"
    validate_manifest(pixel)


def _set(path: str, value):
    def edit(m: dict) -> None:
        *parents, leaf = path.split(".")
        for key in parents:
            m = m[key]
        if value is KeyError:
            del m[leaf]
        else:
            m[leaf] = value
    return edit


BROKEN = [
    (_set("schema_version", 2), "schema_version"),
    (_set("model.family", "unet"), "valid families are dit, udit"),
    (_set("model.attention", {"kind": "local"}), "radius"),
    (_set("latent.channels", KeyError), "latent.channels: missing"),
    (_set("classes.null_label", 3), "null_label == num_classes"),
    (_set("learn_sigma", "yes"), "learn_sigma"),
    (_set("diffusion.beta_end", 2.0), "beta_start < beta_end < 1"),
    (_set("cfg.channels", 5), "cfg.channels"),
    (_set("denoiser.precisions.fp32.sha256", "1" * 64), "differs from files"),
    (_set("denoiser.precisions.fp32.file", "missing.onnx"), "not listed in files"),
    (_set("denoiser.precisions.fp64", {"file": "denoiser.onnx", "sha256": SHA, **IO}), "unknown precision"),
    (_set("denoiser.precisions.fp16.inputs", IO["inputs"][::-1]), "names must be x, t, y"),
    (_set("denoiser.precisions.fp32.outputs", [{"name": "out", "dtype": "double", "shape": [1]}]), "valid dtypes"),
    (_set("image", None), "image: must describe the decoded image"),
    (_set("custom_ops", [{"domain": "com.x", "name": "Attention", "version": 1, "count": 1}]), "is not one of"),
    (_set("files", {"../escape.onnx": SHA}), "inside the package"),
    (_set("exporter.opset", KeyError), "exporter.opset: missing"),
]


@pytest.mark.parametrize("edit, message", BROKEN, ids=[m for _, m in BROKEN])
def test_broken_manifest_names_the_problem(edit, message):
    manifest = good_manifest()
    edit(manifest)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        validate_manifest(manifest)


def test_every_problem_is_reported_at_once():
    manifest = good_manifest()
    manifest["model"]["family"] = "unet"
    manifest["learn_sigma"] = None
    with pytest.raises(ValueError) as err:
        validate_manifest(manifest)
    assert "model.family" in str(err.value) and "learn_sigma" in str(err.value)


def test_hashes_verify_and_refresh(tmp_path):
    (tmp_path / "parity").mkdir()
    for name in ("denoiser.onnx", "parity/inputs.json"):
        (tmp_path / name).write_bytes(name.encode())
    files = hash_files(tmp_path)
    assert files == {name: sha256_file(tmp_path / name) for name in ("denoiser.onnx", "parity/inputs.json")}
    manifest = {"files": files, "denoiser": {"precisions": {"fp32": {"file": "denoiser.onnx", "sha256": "x"}}}}
    assert verify_files(tmp_path, manifest) == []
    (tmp_path / "denoiser.onnx").write_bytes(b"changed")
    assert verify_files(tmp_path, manifest) == ["denoiser.onnx: sha256 mismatch"]
    refresh_hashes(tmp_path, manifest)
    assert verify_files(tmp_path, manifest) == []
    assert manifest["denoiser"]["precisions"]["fp32"]["sha256"] == sha256_file(tmp_path / "denoiser.onnx")


def test_write_json_atomic_leaves_no_temporaries(tmp_path):
    write_json_atomic(tmp_path / "manifest.json", {"a": 1})
    write_json_atomic(tmp_path / "manifest.json", {"a": 2})
    assert json.loads((tmp_path / "manifest.json").read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def _matmul_model(n: int) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(n * n, dtype=np.float32).reshape(n, n) / (n * n), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["out"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, n])], initializer=[w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


def test_external_data_past_the_threshold(tmp_path):
    # the same logic that keeps dit_xl_2 / udit_l under protobuf's 2 GiB limit, with a 1 kB threshold
    model = _matmul_model(64)
    assert onnx_io.tensor_bytes(model) == 64 * 64 * 4
    assert onnx_io.save_model(copy.deepcopy(model), tmp_path / "small.onnx") is None
    assert not (tmp_path / "small.onnx.data").exists()
    assert onnx_io.save_model(copy.deepcopy(model), tmp_path / "big.onnx", threshold=1000) == "big.onnx.data"
    assert (tmp_path / "big.onnx.data").stat().st_size == 64 * 64 * 4
    assert (tmp_path / "big.onnx").stat().st_size < 1000
    onnx_io.check_model(tmp_path / "big.onnx")
    x = np.ones((1, 64), np.float32)
    small = ort.InferenceSession(str(tmp_path / "small.onnx")).run(None, {"x": x})[0]
    big = ort.InferenceSession(str(tmp_path / "big.onnx")).run(None, {"x": x})[0]
    np.testing.assert_array_equal(small, big)
    assert onnx_io.EXTERNAL_DATA_THRESHOLD < 2**31


@pytest.mark.parametrize("opset", [17, onnx_io.MAX_OPSET + 1])
def test_unsupported_opset_names_the_valid_range(opset):
    with pytest.raises(ValueError, match=f"valid range is {onnx_io.MIN_OPSET}..{onnx_io.MAX_OPSET}"):
        onnx_io.check_opset(opset)
