"""exporter.fp16 on small hand-built graphs: what stays fp32, what becomes fp16, and that it stays accurate."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import dit_ops
from dit_ops.local_window_attention import schema as local_schema
from exporter.fp16 import convert_to_fp16

F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16


def _model(nodes, inputs, outputs, inits=(), opset=20, value_info=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits), value_info=list(value_info))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    return onnx.shape_inference.infer_shapes(model)


def _run(model, feeds):
    onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _dtype_of(model, name):
    values = [*model.graph.value_info, *model.graph.input, *model.graph.output]
    return next(v.type.tensor_type.elem_type for v in values if v.name == name)


def _producer(model, op_type):
    return next(n for n in model.graph.node if n.op_type == op_type)


def test_decomposed_layernorm_statistics_stay_fp32_for_large_activations():
    # x - mean has |values| ~ 1000: its square (1e6) overflows fp16, so Pow / ReduceMean / Sqrt must be fp32
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("ReduceMean", ["h", "axes"], ["mean"], keepdims=1),
        helper.make_node("Sub", ["h", "mean"], ["centred"]),
        helper.make_node("Pow", ["centred", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["var"], keepdims=1),
        helper.make_node("Add", ["var", "eps"], ["var_eps"]),
        helper.make_node("Sqrt", ["var_eps"], ["std"]),
        helper.make_node("Div", ["centred", "std"], ["out"]),
    ]
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32) * 40, "w"),
             numpy_helper.from_array(np.array([-1]), "axes"), numpy_helper.from_array(np.float32(2), "two"),
             numpy_helper.from_array(np.float32(1e-6), "eps")]
    model = _model(nodes, [helper.make_tensor_value_info("x", F32, [4, 64])],
                   [helper.make_tensor_value_info("out", F32, [4, 64])], inits)
    x = rng.standard_normal((4, 64)).astype(np.float32) * 3
    ref = _run(model, {"x": x})[0]
    half = convert_to_fp16(model)
    got = _run(half, {"x": x})[0]
    assert got.dtype == np.float32 and np.isfinite(got).all()
    assert np.abs(got - ref).max() < 2e-2  # normalised output ~ N(0, 1)
    assert _dtype_of(half, "h") == F16 and _dtype_of(half, "sq") == F32 and _dtype_of(half, "std") == F32
    assert numpy_helper.to_array(next(t for t in half.graph.initializer if t.name.startswith("w"))).dtype == np.float16


def test_timestep_sinusoid_stays_fp32_until_the_first_matmul():
    half_dim = 64
    freqs = np.exp(-np.log(10000.0) * np.arange(half_dim) / half_dim).astype(np.float32)
    nodes = [
        helper.make_node("Unsqueeze", ["t", "one"], ["t2"]),
        helper.make_node("Mul", ["t2", "freqs"], ["phase"]),
        helper.make_node("Cos", ["phase"], ["c"]),
        helper.make_node("Sin", ["phase"], ["s"]),
        helper.make_node("Concat", ["c", "s"], ["emb"], axis=-1),
        helper.make_node("MatMul", ["emb", "w"], ["out"]),
    ]
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(np.array([1]), "one"), numpy_helper.from_array(freqs, "freqs"),
             numpy_helper.from_array(rng.standard_normal((2 * half_dim, 16)).astype(np.float32) * 0.1, "w")]
    model = _model(nodes, [helper.make_tensor_value_info("t", F32, ["n"])],
                   [helper.make_tensor_value_info("out", F32, ["n", 16])], inits)
    t = np.arange(0, 1000, 37, dtype=np.float32)
    t[-1] = 999
    ref = _run(model, {"t": t})[0]
    half = convert_to_fp16(model)
    got = _run(half, {"t": t})[0]
    assert _dtype_of(half, "phase") == F32 and _dtype_of(half, "emb") == F32
    # fp16 phases at t = 999 would be off by up to 0.25 rad; the fp32 sinusoid keeps the error at fp16 matmul level
    assert np.abs(got - ref).max() < 5e-3 * np.abs(ref).max()


def test_shared_constant_embedding_table_and_mask_constant():
    table = np.random.default_rng(2).standard_normal((11, 8)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "y"], ["emb"]),
        helper.make_node("Mul", ["emb", "gamma"], ["scaled"]),  # gamma used by an fp16 and an fp32 node
        helper.make_node("LayerNormalization", ["scaled", "gamma", "beta"], ["normed"], axis=-1),
        helper.make_node("Constant", [], ["mask"], value=numpy_helper.from_array(
            np.array([[0, 0, 0, 0, 0, 0, -1e9, -1e9]], np.float32))),
        helper.make_node("Add", ["scaled", "mask"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
        helper.make_node("Add", ["probs", "normed"], ["out"]),
    ]
    inits = [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.linspace(0.5, 1.5, 8, dtype=np.float32), "gamma"),
             numpy_helper.from_array(np.zeros(8, np.float32), "beta")]
    model = _model(nodes, [helper.make_tensor_value_info("y", TensorProto.INT64, [3])],
                   [helper.make_tensor_value_info("out", F32, [3, 8])], inits)
    y = np.array([0, 10, 5])
    ref = _run(model, {"y": y})[0]
    half = convert_to_fp16(model)
    got = _run(half, {"y": y})[0]
    np.testing.assert_allclose(got, ref, atol=2e-3)
    inits = {t.name: t.data_type for t in half.graph.initializer}
    assert inits["table__fp16"] == F16 and "table" not in inits  # gathered in fp16
    assert inits["gamma"] == F32 and inits["gamma__fp16"] == F16  # LN keeps fp32, the Mul gets a copy
    assert _dtype_of(half, "emb") == F16 and _dtype_of(half, "normed") == F32 and _dtype_of(half, "masked") == F16
    mask = numpy_helper.to_array(half.graph.initializer[[t.name for t in half.graph.initializer].index("mask__fp16")])
    assert np.isfinite(mask).all() and mask.min() == np.float16(-65504)  # clipped, not -inf


def test_graph_inputs_and_outputs_stay_float32():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["out"])]
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    model = _model(nodes, [helper.make_tensor_value_info("x", F32, [2, 4])],
                   [helper.make_tensor_value_info("out", F32, [2, 4])], [w])
    half = convert_to_fp16(model)
    assert [i.type.tensor_type.elem_type for i in half.graph.input] == [F32]
    assert [o.type.tensor_type.elem_type for o in half.graph.output] == [F32]
    assert [n.op_type for n in half.graph.node] == ["Cast", "MatMul", "Cast"]
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(_run(half, {"x": x})[0], x)
    assert model.graph.node[0].input[1] == "w"  # the input model is untouched


def test_dit_ops_node_takes_fp16_activations_and_fp32_scales():
    b, h, gh, gw, d = 1, 2, 6, 6, 8
    attrs = local_schema.node_attributes(h, d, gh, gw, radius=2, down_factor=2)
    nodes = [
        helper.make_node("Mul", ["q", "one"], ["q1"]),
        helper.make_node(local_schema.OP_TYPE, ["q1", "k", "v", "scale", "pool"], ["out"], domain=dit_ops.DOMAIN,
                         **attrs),
    ]
    shape = [b, h, gh * gw, d]
    inits = [numpy_helper.from_array(np.float32(1.0), "one"),
             numpy_helper.from_array(np.full(h, d ** -0.5, np.float32), "scale"),
             numpy_helper.from_array(np.full(4, 0.25, np.float32), "pool")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, F32, shape) for n in "qkv"],
                              [helper.make_tensor_value_info("out", F32, shape)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(dit_ops.DOMAIN, 1)],
                              ir_version=10)
    model = dit_ops.attach_functions(model)
    rng = np.random.default_rng(3)
    feeds = {n: rng.standard_normal(shape).astype(np.float32) for n in "qkv"}
    ref = _run(model, feeds)[0]
    half = convert_to_fp16(model)
    got = _run(half, feeds)[0]
    node = next(n for n in half.graph.node if n.domain == dit_ops.DOMAIN)
    inits = {t.name: t.data_type for t in half.graph.initializer}
    assert inits[node.input[3]] == F32 and inits[node.input[4]] == F32
    assert _dtype_of(onnx.shape_inference.infer_shapes(half), node.input[0]) == F16
    np.testing.assert_allclose(got, ref, atol=5e-3)


def test_control_flow_is_refused():
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["o"])], "b", [],
                               [helper.make_tensor_value_info("o", F32, [1])])
    nodes = [helper.make_node("If", ["c"], ["out"], then_branch=branch, else_branch=branch)]
    model = helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, []), helper.make_tensor_value_info("x", F32, [1])],
        [helper.make_tensor_value_info("out", F32, [1])]), opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    with pytest.raises(ValueError, match="control-flow"):
        convert_to_fp16(model)


def test_opset23_attention_keeps_an_fp32_softmax():
    shape = [1, 2, 16, 8]
    nodes = [helper.make_node("Attention", ["q", "k", "v"], ["out"])]
    model = _model(nodes, [helper.make_tensor_value_info(n, F32, shape) for n in "qkv"],
                   [helper.make_tensor_value_info("out", F32, shape)], opset=23)
    rng = np.random.default_rng(4)
    feeds = {n: (rng.standard_normal(shape) * 4).astype(np.float32) for n in "qkv"}
    ref = _run(model, feeds)[0]
    half = convert_to_fp16(model)
    node = _producer(half, "Attention")
    assert {a.name: a.i for a in node.attribute}["softmax_precision"] == F32
    assert np.abs(_run(half, feeds)[0] - ref).max() < 1e-2 * np.abs(ref).max()  # fp16 rounding of q, k, v
