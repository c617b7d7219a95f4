"""Engine building (batch profiles, plugin node checks) and the numpy TensorRT session.

The end-to-end tests build real engines from one-node dit_ops graphs and compare them with the torch
references; they need TensorRT >= 10.9 and a GPU and skip with the probe's reason elsewhere.
"""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dit_ops import tensorrt_probe
from dit_ops.downsampled_attention import schema as ds_schema
from dit_ops.local_window_attention import schema as lw_schema
from exporter.trt_engine import batch_profile, build_engine, plugin_nodes
from runtime.tensorrt_session import TensorRTSession, engine_path_for, open_session

ELEMENT = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}


def attention_model(path, op: str, dtype, heads: int, head_dim: int, grid_h: int, grid_w: int, **attrs) -> dict:
    """One dit_ops node over dynamic-batch q, k, v; parameters as initializers. Returns the parameters."""
    rng = np.random.default_rng(0)
    tokens = grid_h * grid_w
    io = [helper.make_tensor_value_info(n, ELEMENT[dtype], ["batch", heads, tokens, head_dim]) for n in "qkv"]
    if op == "LocalWindowAttention":
        d = attrs["down_factor"]
        params = {"scale": (rng.random(heads) + 0.3).astype(dtype),
                  "pool_weight": (rng.random(max(d * d, 1)) / max(d * d, 1)).astype(dtype)}
        node_attrs = lw_schema.node_attributes(heads, head_dim, grid_h, grid_w, attrs["radius"], d)
    else:
        params = {"logit_scale": np.array([2.3, 4.9] * heads, dtype=dtype)[:heads]}
        node_attrs = ds_schema.node_attributes(heads, head_dim, grid_h, grid_w, attrs["rope"], attrs["cosine"])
    node = helper.make_node(op, ["q", "k", "v", *params], ["out"], domain="dit_ops", **node_attrs)
    out = helper.make_tensor_value_info("out", ELEMENT[dtype], ["batch", heads, tokens, head_dim])
    graph = helper.make_graph([node], op, io, [out], [numpy_helper.from_array(a, n) for n, a in params.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("dit_ops", 1)],
                              ir_version=10)
    onnx.save(model, str(path))
    return params


def denoiser_like(path, dims=("batch", 4, 8, 8)) -> None:
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims)),
              helper.make_tensor_value_info("t", TensorProto.INT64, ["batch"]),
              helper.make_tensor_value_info("y", TensorProto.INT64, ["batch"])]
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, list(dims))
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["out"])], "d", inputs, [out])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10), str(path))


def test_batch_profile_varies_only_dim_0(tmp_path):
    denoiser_like(tmp_path / "d.onnx")
    assert batch_profile(tmp_path / "d.onnx", 1, 2, 8) == {
        "x": ((1, 4, 8, 8), (2, 4, 8, 8), (8, 4, 8, 8)), "t": ((1,), (2,), (8,)), "y": ((1,), (2,), (8,)),
    }
    attention_model(tmp_path / "a.onnx", "LocalWindowAttention", np.float32, 2, 16, 4, 6, radius=2, down_factor=2)
    assert batch_profile(tmp_path / "a.onnx", 1, 1, 4)["q"] == ((1, 2, 24, 16), (1, 2, 24, 16), (4, 2, 24, 16))


def test_batch_profile_rejects_bad_requests(tmp_path):
    denoiser_like(tmp_path / "d.onnx", dims=("batch", 4, "height", 8))
    with pytest.raises(ValueError, match="'x' dim 2 is dynamic"):
        batch_profile(tmp_path / "d.onnx", 1, 1, 1)
    with pytest.raises(ValueError, match="min_batch <= opt_batch"):
        batch_profile(tmp_path / "d.onnx", 2, 1, 4)
    with pytest.raises(FileNotFoundError):
        batch_profile(tmp_path / "missing.onnx", 1, 1, 1)


def test_plugin_nodes_need_the_plugin_namespace(tmp_path):
    path = tmp_path / "a.onnx"
    attention_model(path, "DownsampledAttention", np.float32, 2, 16, 4, 4, rope=True, cosine=True)
    assert plugin_nodes(path) == {"DownsampledAttention": 1}
    model = onnx.load(str(path))
    attrs = [a for a in model.graph.node[0].attribute if a.name != "plugin_namespace"]
    del model.graph.node[0].attribute[:]
    model.graph.node[0].attribute.extend(attrs)
    onnx.save(model, str(path))
    with pytest.raises(ValueError, match="plugin_namespace=None"):
        plugin_nodes(path)


def test_engine_path_sits_next_to_the_onnx_file(tmp_path):
    assert engine_path_for(tmp_path / "denoiser_fp16.onnx") == tmp_path / "denoiser_fp16.engine"


@pytest.mark.skipif(tensorrt_probe.probe().available, reason="TensorRT and a GPU are available here")
def test_without_tensorrt_building_and_running_fail_with_the_reason(tmp_path):
    denoiser_like(tmp_path / "d.onnx")
    reason = tensorrt_probe.probe().reason
    with pytest.raises(tensorrt_probe.TensorRTUnavailable) as error:
        build_engine(tmp_path / "d.onnx", tmp_path / "d.engine")
    assert str(error.value) == reason
    with pytest.raises(tensorrt_probe.TensorRTUnavailable):
        open_session(tmp_path / "d.onnx")
    with pytest.raises(tensorrt_probe.TensorRTUnavailable):
        TensorRTSession(tmp_path / "d.engine")


@pytest.fixture(scope="module")
def gpu():
    status = tensorrt_probe.probe()
    if not status.available:
        pytest.skip(status.reason)
    return status


E2E = [  # op, dtype, heads, head_dim, grid_h, grid_w, attributes
    ("LocalWindowAttention", np.float32, 2, 64, 13, 21, {"radius": 4, "down_factor": 0}),
    ("LocalWindowAttention", np.float16, 2, 64, 16, 24, {"radius": 5, "down_factor": 4}),
    ("DownsampledAttention", np.float32, 2, 48, 18, 30, {"rope": True, "cosine": True}),
    ("DownsampledAttention", np.float16, 2, 64, 32, 32, {"rope": True, "cosine": True}),
    ("DownsampledAttention", np.float16, 2, 32, 20, 12, {"rope": False, "cosine": False}),
]


@pytest.mark.parametrize("op, dtype, heads, head_dim, grid_h, grid_w, attrs", E2E)
def test_engine_matches_torch_reference(gpu, tmp_path, op, dtype, heads, head_dim, grid_h, grid_w, attrs):
    torch = pytest.importorskip("torch")
    onnx_path = tmp_path / "model.onnx"
    params = attention_model(onnx_path, op, dtype, heads, head_dim, grid_h, grid_w, **attrs)
    build_engine(onnx_path, engine_path_for(onnx_path), min_batch=1, opt_batch=2, max_batch=4)
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((3, heads, grid_h * grid_w, head_dim)).astype(dtype) for _ in range(3))
    with open_session(onnx_path) as session:
        (out,) = session.run(None, {"q": q, "k": k, "v": v})
        with pytest.raises(ValueError, match="outside the engine's profile"):
            session.run(None, {"q": np.concatenate([q, q]), "k": np.concatenate([k, k]), "v": np.concatenate([v, v])})
    t = [torch.from_numpy(a.astype(np.float32)) for a in (q, k, v)]
    if op == "LocalWindowAttention":
        from dit_ops.local_window_attention.reference import dense_local_window_attention

        d = attrs["down_factor"]
        scale = torch.from_numpy(params["scale"].astype(np.float32))
        pool_weight = torch.from_numpy(params["pool_weight"].astype(np.float32)) if d else None
        ref = dense_local_window_attention(*t, scale, grid_h=grid_h, grid_w=grid_w, radius=attrs["radius"],
                                           down_factor=d, pool_weight=pool_weight)
    else:
        from dit_ops.downsampled_attention.reference import downsampled_attention

        ref = downsampled_attention(*t, torch.from_numpy(params["logit_scale"].astype(np.float32)), grid_h=grid_h,
                                    grid_w=grid_w, rope=attrs["rope"], cosine=attrs["cosine"])
    ref = ref.numpy()
    assert out.dtype == dtype and out.shape == ref.shape
    error = np.abs(out.astype(np.float32) - ref).max() / np.abs(ref).max()
    assert error < (1e-4 if dtype == np.float32 else 2e-3)


def test_export_engine_flag_fails_clearly_without_tensorrt(tmp_path):
    import subprocess
    import sys

    status = tensorrt_probe.probe()
    if status.available:
        pytest.skip("TensorRT and a GPU are present; the failure path is not reachable here")
    cli = subprocess.run([sys.executable, "-m", "exporter.cli", "--model", "dit_tiny_2", "--latent-size", "8",
                          "--engine", "trt", "--out", str(tmp_path / "pkg")], capture_output=True, text=True)
    assert cli.returncode == 2 and "TensorRT" in cli.stderr and "docs/gpu_deployment.md" in cli.stderr
    assert not (tmp_path / "pkg").exists()  # refused before exporting anything
