"""dit_ops in ONNX: one custom node per call from torch.onnx.export, attached function bodies run by ONNX
Runtime with standard ops, equal to the torch reference; the local-attention body stays linear in tokens."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx.inliner
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

import dit_ops
from dit_ops.downsampled_attention import schema as ds_schema
from dit_ops.downsampled_attention.reference import downsampled_attention
from dit_ops.local_window_attention import schema as lw_schema
from dit_ops.local_window_attention.reference import dense_local_window_attention, local_window_attention
from dit_ops.onnx_functions import attach_functions, custom_nodes, function_proto

_NP_TYPE = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}


def _node_model(op_type: str, attrs: dict, feeds: dict[str, np.ndarray], opset: int = 18) -> onnx.ModelProto:
    """A one-node model `dit_ops::<op_type>` over `feeds` (output shaped like the first input), bodies attached."""
    first = next(iter(feeds.values()))
    inputs = [helper.make_tensor_value_info(name, _NP_TYPE[a.dtype.type], a.shape) for name, a in feeds.items()]
    output = helper.make_tensor_value_info("out", _NP_TYPE[first.dtype.type], first.shape)
    node = helper.make_node(op_type, list(feeds), ["out"], domain=dit_ops.DOMAIN, **attrs)
    graph = helper.make_graph([node], op_type, inputs, [output])
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(dit_ops.DOMAIN, 1)], ir_version=10
    )
    return attach_functions(model)


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _qkv(n: int, heads: int = 3, dim: int = 8, batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, dim, generator=gen) for _ in range(3)]


def _local_case(grid_h, grid_w, radius, d, heads=3, dim=8, seed=0):
    q, k, v = _qkv(grid_h * grid_w, heads, dim, seed=seed)
    scale = dim**-0.5 * (0.5 + torch.rand(heads, generator=torch.Generator().manual_seed(seed)))
    weight = torch.full((d * d,), 1.0 / d**2) + 0.05 * torch.randn(d * d) if d else None
    return q, k, v, scale, weight


# ---------------------------------------------------------------- function bodies == torch


@pytest.mark.parametrize(
    "grid_h, grid_w, radius, d, tile",
    [
        (8, 8, 2, 0, 16), (9, 13, 3, 0, 16), (13, 21, 5, 0, 4), (1, 40, 4, 0, 16), (17, 6, 8, 0, (3, 5)),
        (5, 7, 20, 0, 16), (8, 12, 3, 2, 16), (16, 16, 8, 4, 6), (12, 20, 2, 4, 16),
    ],
)
def test_local_body_matches_torch(grid_h, grid_w, radius, d, tile):
    q, k, v, scale, weight = _local_case(grid_h, grid_w, radius, d)
    attrs = lw_schema.node_attributes(3, 8, grid_h, grid_w, radius, d, tile)
    feeds = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "scale": scale.numpy(),
             "pool_weight": (weight if d else torch.ones(1)).numpy()}
    model = _node_model("LocalWindowAttention", attrs, feeds)
    ref = dense_local_window_attention(q, k, v, scale, grid_h=grid_h, grid_w=grid_w, radius=radius,
                                       down_factor=d, pool_weight=weight).numpy()
    np.testing.assert_allclose(_run(model, feeds), ref, atol=1e-5, rtol=0)
    # these nodes fit one chunk of tiles: the attached body is unrolled; the Scan form gives the same result
    assert "Scan" not in {node.op_type for node in model.functions[0].node}
    model.functions[0].CopyFrom(function_proto("LocalWindowAttention", 18, pooled=d > 0, chunked=True))
    np.testing.assert_allclose(_run(model, feeds), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("heads, d", [(1, 0), (3, 0), (3, 4)])
def test_local_body_in_chunks_matches_torch(heads, d):
    # 72 tiles of 8 x 8 on a 72 x 64 grid in chunks of 16 / 5 / 2 tiles: the last chunk repeats the last tile
    grid_h, grid_w, radius = 72, 64, 8
    q, k, v, scale, weight = _local_case(grid_h, grid_w, radius, d, heads=heads)
    attrs = lw_schema.node_attributes(heads, 8, grid_h, grid_w, radius, d, 8)
    feeds = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "scale": scale.numpy(),
             "pool_weight": (weight if d else torch.ones(1)).numpy()}
    model = _node_model("LocalWindowAttention", attrs, feeds)
    assert "Scan" in {node.op_type for node in model.functions[0].node}
    ref = dense_local_window_attention(q, k, v, scale, grid_h=grid_h, grid_w=grid_w, radius=radius,
                                       down_factor=d, pool_weight=weight)
    np.testing.assert_allclose(_run(model, feeds), ref.numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("grid", [(8, 8), (6, 10), (2, 2)])
@pytest.mark.parametrize("rope, cosine", [(1, 1), (0, 1), (1, 0), (0, 0)])
def test_downsampled_body_matches_torch(grid, rope, cosine):
    q, k, v = _qkv(grid[0] * grid[1], dim=16)
    logit_scale = torch.tensor([math.log(10.0), 5.0, -1.0])  # init, clamped at ln 100, low temperature
    feeds = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "logit_scale": logit_scale.numpy()}
    attrs = ds_schema.node_attributes(3, 16, grid[0], grid[1], rope, cosine)
    out = _run(_node_model("DownsampledAttention", attrs, feeds), feeds)
    ref = downsampled_attention(q, k, v, logit_scale, grid_h=grid[0], grid_w=grid[1], rope=bool(rope), cosine=bool(cosine))
    # fp32 rounding amplified by the clamped temperature of 100 on the second head
    np.testing.assert_allclose(out, ref.numpy(), atol=2e-5, rtol=0)
    np.testing.assert_allclose(out[:, [0, 2]], ref.numpy()[:, [0, 2]], atol=1e-5, rtol=0)


@pytest.mark.parametrize("opset", [18, 21, 23])
def test_bodies_follow_model_opset(opset):
    q, k, v, scale, weight = _local_case(6, 9, 3, 0)
    feeds = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "scale": scale.numpy(), "pool_weight": np.ones(1, np.float32)}
    model = _node_model("LocalWindowAttention", lw_schema.node_attributes(3, 8, 6, 9, 3, 0), feeds, opset)
    onnx.checker.check_model(model, full_check=True)
    assert {(f.name, e.version) for f in model.functions for e in f.opset_import if e.domain == ""} == {
        ("LocalWindowAttention", opset)
    }
    ref = dense_local_window_attention(q, k, v, scale, grid_h=6, grid_w=9, radius=3)
    np.testing.assert_allclose(_run(model, feeds), ref.numpy(), atol=1e-5, rtol=0)


def test_fp16_bodies_accumulate_in_float():
    q, k, v, scale, weight = _local_case(12, 16, 4, 2)
    half = {"q": q.half().numpy(), "k": k.half().numpy(), "v": v.half().numpy(), "scale": scale.half().numpy(),
            "pool_weight": weight.half().numpy()}
    out = _run(_node_model("LocalWindowAttention", lw_schema.node_attributes(3, 8, 12, 16, 4, 2), half), half)
    ref = dense_local_window_attention(q, k, v, scale, grid_h=12, grid_w=16, radius=4, down_factor=2, pool_weight=weight)
    assert out.dtype == np.float16 and np.isfinite(out).all()
    assert _cosine(out, ref.numpy()) >= 0.999

    q, k, v = _qkv(8 * 12, dim=16)
    logit_scale = torch.tensor([math.log(10.0), 5.0, 1.0])
    half = {"q": q.half().numpy(), "k": k.half().numpy(), "v": v.half().numpy(), "logit_scale": logit_scale.half().numpy()}
    out = _run(_node_model("DownsampledAttention", ds_schema.node_attributes(3, 16, 8, 12, 1, 1), half), half)
    ref = downsampled_attention(q, k, v, logit_scale, grid_h=8, grid_w=12)
    assert out.dtype == np.float16 and np.isfinite(out).all()
    assert _cosine(out, ref.numpy()) >= 0.999


# ---------------------------------------------------------------- torch.onnx.export -> one custom node


class _Block(torch.nn.Module):
    """Both ops on one 8 x 12 token grid, with their parameters, as a model would call them."""

    def __init__(self, heads: int, radius: int, down_factor: int, rope: bool, cosine: bool):
        super().__init__()
        self.local = dict(grid_h=8, grid_w=12, radius=radius, down_factor=down_factor)
        self.downsampled = dict(grid_h=8, grid_w=12, rope=rope, cosine=cosine)
        self.scale = torch.nn.Parameter(0.3 + torch.rand(heads))
        self.pool_weight = torch.nn.Parameter(torch.full((down_factor**2,), 1.0 / down_factor**2)) if down_factor else None
        self.logit_scale = torch.nn.Parameter(torch.linspace(1.0, 5.0, heads))

    def forward(self, q, k, v):
        local = local_window_attention(q, k, v, self.scale, pool_weight=self.pool_weight, **self.local)
        return local + downsampled_attention(q, k, v, self.logit_scale, **self.downsampled) * 0.5


def _export(module: torch.nn.Module, args: tuple, opset: int | None) -> onnx.ModelProto:
    """Export with a dynamic batch axis and attach the bodies."""
    kwargs = {} if opset is None else {"opset_version": opset}
    batch = torch.export.Dim("batch")
    program = torch.onnx.export(module, args, dynamo=True, custom_translation_table=dit_ops.translation_table(),
                                dynamic_shapes=({0: batch}, {0: batch}, {0: batch}), verbose=False, **kwargs)
    return dit_ops.attach_functions(program.model_proto)


@pytest.mark.parametrize("opset, radius, down_factor, rope, cosine", [(18, 3, 0, True, True), (23, 5, 2, False, False)])
def test_export_one_custom_node_per_call(opset, radius, down_factor, rope, cosine):
    torch.manual_seed(0)
    module = _Block(3, radius, down_factor, rope, cosine)
    args = tuple(_qkv(8 * 12))
    model = _export(module, args, opset)
    nodes = custom_nodes(model)
    assert sorted(node.op_type for node in nodes) == ["DownsampledAttention", "LocalWindowAttention"]
    expected = {
        "LocalWindowAttention": lw_schema.node_attributes(3, 8, 8, 12, radius, down_factor),
        "DownsampledAttention": ds_schema.node_attributes(3, 8, 8, 12, rope, cosine),
    }
    for node in nodes:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        want = {key: value.encode() if isinstance(value, str) else value for key, value in expected[node.op_type].items()}
        assert attrs == want
        inputs = lw_schema.INPUTS if node.op_type == "LocalWindowAttention" else ds_schema.INPUTS
        assert len(node.input) == len(inputs)
    assert sorted(f.name for f in model.functions if f.domain == "dit_ops") == sorted(expected)
    onnx.checker.check_model(model, full_check=True)
    other_batch = tuple(_qkv(8 * 12, batch=3, seed=1))
    feeds = {i.name: a.numpy() for i, a in zip(model.graph.input, other_batch)}
    with torch.no_grad():
        ref = module(*other_batch).numpy()
    np.testing.assert_allclose(_run(model, feeds), ref, atol=1e-5, rtol=0)


def test_export_fp16_model():
    torch.manual_seed(0)
    module = _Block(2, 4, 2, True, True)
    args = tuple(_qkv(8 * 12, heads=2, dim=16))
    with torch.no_grad():
        ref = module(*args).numpy()
    model = _export(module.half(), tuple(a.half() for a in args), None)
    assert len(custom_nodes(model)) == 2
    onnx.checker.check_model(model, full_check=True)
    out = _run(model, {i.name: a.half().numpy() for i, a in zip(model.graph.input, args)})
    assert out.dtype == np.float16 and np.isfinite(out).all()
    assert _cosine(out, ref) >= 0.999


# ---------------------------------------------------------------- attach_functions


def test_attach_functions_is_idempotent_and_checks_names():
    feeds = {"q": np.zeros((1, 1, 16, 4), np.float32), "k": np.zeros((1, 1, 16, 4), np.float32),
             "v": np.zeros((1, 1, 16, 4), np.float32), "logit_scale": np.zeros(1, np.float32)}
    model = _node_model("DownsampledAttention", ds_schema.node_attributes(1, 4, 4, 4, 1, 1), feeds)
    attach_functions(model)
    assert [f.name for f in model.functions] == ["DownsampledAttention"]
    model.graph.node[0].op_type = "Unknown"
    with pytest.raises(ValueError, match="valid: DownsampledAttention, LocalWindowAttention"):
        attach_functions(model)
    with pytest.raises(ValueError, match="opset >= 18"):
        function_proto("LocalWindowAttention", 17)


# ---------------------------------------------------------------- the local body is linear in tokens


def _largest_intermediate(side: int) -> int:
    """Elements of the largest value computed by the inlined body (ONNX Runtime, every value an output)."""
    n = side * side
    feeds = {"q": np.ones((1, 1, n, 4), np.float32), "k": np.ones((1, 1, n, 4), np.float32),
             "v": np.ones((1, 1, n, 4), np.float32), "scale": np.ones(1, np.float32), "pool_weight": np.ones(1, np.float32)}
    model = onnx.inliner.inline_local_functions(
        _node_model("LocalWindowAttention", lw_schema.node_attributes(1, 4, side, side, 8, 0), feeds)
    )
    names = [name for node in model.graph.node for name in node.output if name]
    del model.graph.output[:]
    model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return max(value.size for value in session.run(None, feeds))


def test_local_body_memory_is_linear_in_tokens():
    small, large = _largest_intermediate(64), _largest_intermediate(128)
    assert large < (128 * 128) ** 2 / 4  # nowhere near N x N
    assert large / small <= 4.5, (small, large)
