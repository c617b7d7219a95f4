"""float32 -> float16 ONNX conversion that keeps the numerically sensitive parts in float32.

Each node gets one precision, decided in graph order:
- matmul-like ops (MatMul, Gemm, Conv, Einsum, Attention) and the dit_ops attention nodes run in fp16: they hold
  the weights and the FLOPs (the dit_ops function bodies upcast to fp32 inside, softmax included,
  and their per-head scale / pooling-weight inputs are kept fp32);
- normalisation statistics, softmax, reductions and Pow/Exp run in fp32 (fp16 overflows at 65504:
  squares of activations > 256, exp of logits > 11, sums over many tokens); an opset-23 Attention
  node runs in fp16 with softmax_precision=float;
- any other op runs in fp32 when all its non-constant float inputs are fp32 (so the timestep
  embedding, which starts from the fp32 input `t`, stays fp32 up to its first Gemm: t * freq at
  t = 999 needs more than fp16's 11 bits of mantissa), and in fp16 otherwise; ops that read only
  float constants (a Gather from an embedding table) run in fp16 so the weights are stored in fp16.
Casts are inserted where a value crosses precisions; graph inputs and outputs stay float32, so the
runtime feeds the same arrays to every precision. Constants are stored in the precision of their
consumers (duplicated when both use them).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FP32, FP16 = TensorProto.FLOAT, TensorProto.FLOAT16
FP16_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum", "Attention"})
FP32_OPS = frozenset({
    "Softmax", "LogSoftmax", "LayerNormalization", "GroupNormalization", "InstanceNormalization",
    "BatchNormalization", "RMSNormalization", "SimplifiedLayerNormalization", "LpNormalization",
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp", "ReduceProd",
    "Pow", "Exp", "Log", "Sin", "Cos", "CumSum", "RotaryEmbedding",
})
FP16_DOMAINS = frozenset({"dit_ops"})
# Inputs kept in fp32 whatever the node's precision: (domain, first index); dit_ops' scale inputs.
_FP32_INPUTS_FROM = {"dit_ops": 3}
# Inputs that carry no data precision of their own (shape-like float inputs): left untouched.
_UNTOUCHED_INPUTS = {"Resize": {1, 2}, "Upsample": {1}}
# Ops that only look at the shape or produce ints: their float inputs are not cast.
_SHAPE_OPS = frozenset({"Shape", "Size"})
_FP16_MAX = float(np.finfo(np.float16).max)


def _inferred_value_info(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Type inference on a weight-free copy (initializers become typed inputs), so it works past 2 GB."""
    graph = model.graph
    light = onnx.ModelProto()
    light.ir_version, light.graph.name = model.ir_version, graph.name
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    light.graph.node.extend(graph.node)
    light.graph.input.extend(graph.input)
    light.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in graph.initializer)
    light.graph.output.extend(graph.output)
    light.graph.value_info.extend(graph.value_info)
    return list(onnx.shape_inference.infer_shapes(light).graph.value_info)


def _float_dtypes(model: onnx.ModelProto) -> dict[str, int]:
    """elem_type of every named value (graph inputs/outputs, value_info, initializers, Constant nodes);
    values the exporter left untyped are typed by ONNX inference."""
    graph = model.graph
    dtypes = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output, *graph.value_info]}
    dtypes.update({t.name: t.data_type for t in graph.initializer})
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    dtypes[node.output[0]] = a.t.data_type
    if any(out and out not in dtypes for node in graph.node for out in node.output):
        dtypes.update({v.name: v.type.tensor_type.elem_type for v in _inferred_value_info(model)})
    return dtypes


def _to_fp16_array(array: np.ndarray) -> np.ndarray:
    """Clip finite values into fp16 range (mask constants like -1e9 stay very negative, not -inf)."""
    finite = np.isfinite(array)
    return np.where(finite, np.clip(array, -_FP16_MAX, _FP16_MAX), array).astype(np.float16)


def _node_precision(node: onnx.NodeProto, float_inputs: list[str], consts: set[str], current: dict[str, int]) -> int:
    if node.op_type in FP32_OPS:
        return FP32
    if node.domain in FP16_DOMAINS or node.op_type in FP16_OPS:
        return FP16
    live = [name for name in float_inputs if name not in consts]
    if not live:  # weights read by index (embedding tables) are stored and gathered in fp16
        return FP16 if float_inputs else FP32
    return FP32 if all(current[name] == FP32 for name in live) else FP16


def convert_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A new ModelProto running in fp16 with fp32 islands; `model` is not modified."""
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        raise ValueError("fp16 conversion does not handle control-flow subgraphs (If/Loop/Scan)")
    dtypes = _float_dtypes(model)
    initializers = {t.name: t for t in graph.initializer}
    constant_nodes = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    consts = set(initializers) | set(constant_nodes)

    current: dict[str, int] = {v.name: v.type.tensor_type.elem_type for v in graph.input}  # value -> dtype now
    new_nodes: list[onnx.NodeProto] = []
    new_inits: dict[str, onnx.TensorProto] = {}
    cast_cache: dict[tuple[str, int], str] = {}
    used_consts: set[str] = set()

    def const_as(name: str, dtype: int) -> str:
        if dtype == FP32:
            used_consts.add(name)
            return name
        half = f"{name}__fp16"
        if half not in new_inits:
            source = initializers[name] if name in initializers else constant_nodes[name].attribute[0].t
            new_inits[half] = numpy_helper.from_array(_to_fp16_array(numpy_helper.to_array(source)), half)
        return half

    def value_as(name: str, dtype: int) -> str:
        if current[name] == dtype:
            return name
        key = (name, dtype)
        if key not in cast_cache:
            cast_cache[key] = f"{name}__as_{'fp16' if dtype == FP16 else 'fp32'}"
            new_nodes.append(helper.make_node("Cast", [name], [cast_cache[key]], to=dtype,
                                              name=f"{cast_cache[key]}__cast"))
            current[cast_cache[key]] = dtype
        return cast_cache[key]

    for node in graph.node:
        new = onnx.NodeProto()
        new.CopyFrom(node)
        if node.op_type == "Constant":
            current[node.output[0]] = dtypes.get(node.output[0], 0)
            new_nodes.append(new)
            continue
        untouched = _UNTOUCHED_INPUTS.get(node.op_type, set())
        float_inputs = [
            name for i, name in enumerate(node.input)
            if name and dtypes.get(name) in (FP32, FP16) and i not in untouched
        ]
        precision = _node_precision(node, float_inputs, consts, current)
        fp32_from = _FP32_INPUTS_FROM.get(node.domain, len(node.input))
        if node.op_type not in _SHAPE_OPS:
            for i, name in enumerate(node.input):
                if name in float_inputs:
                    dtype = FP32 if i >= fp32_from else precision
                    new.input[i] = const_as(name, dtype) if name in consts else value_as(name, dtype)
                elif name in consts:
                    used_consts.add(name)
        else:
            used_consts.update(n for n in node.input if n in consts)
        if node.op_type == "Attention" and node.domain in ("", "ai.onnx") and precision == FP16:
            # opset-23 Attention (SDPA at --opset 23): keep its softmax in fp32 like every other softmax
            kept = [a for a in new.attribute if a.name != "softmax_precision"]
            del new.attribute[:]
            new.attribute.extend([*kept, helper.make_attribute("softmax_precision", FP32)])
        if node.op_type == "Cast":
            for a in new.attribute:
                if a.name == "to" and a.i in (FP32, FP16):
                    a.i = precision
        for out in node.output:
            original = dtypes.get(out)
            current[out] = precision if original in (FP32, FP16) else (original or 0)
        new_nodes.append(new)

    # graph outputs: cast back to float32 under their original names
    renames: dict[str, str] = {}
    for out in graph.output:
        if out.type.tensor_type.elem_type == FP32 and current.get(out.name) == FP16:
            renames[out.name] = f"{out.name}__fp16"
    if renames:
        for node in new_nodes:
            for i, name in enumerate(node.input):
                if name in renames:
                    node.input[i] = renames[name]
            for i, name in enumerate(node.output):
                if name in renames:
                    node.output[i] = renames[name]
        for original, half in renames.items():
            new_nodes.append(helper.make_node("Cast", [half], [original], to=FP32, name=f"{original}__to_fp32"))
            current[half] = FP16

    referenced = {name for n in new_nodes for name in n.input} | {o.name for o in graph.output}
    result = _empty_like(model)
    out = result.graph
    out.name, out.doc_string = graph.name, graph.doc_string
    out.input.extend(graph.input)
    out.output.extend(graph.output)
    out.node.extend(n for n in new_nodes if n.op_type != "Constant" or n.output[0] in referenced)
    out.initializer.extend(initializers[n] for n in initializers if n in used_consts and n in referenced)
    out.initializer.extend(t for name, t in new_inits.items() if name in referenced)
    for v in graph.value_info:
        name = renames.get(v.name, v.name)
        if name not in current:
            continue
        info = out.value_info.add()
        info.CopyFrom(v)
        info.name = name
        if info.type.tensor_type.elem_type in (FP32, FP16):
            info.type.tensor_type.elem_type = current[name]
    return result


def _empty_like(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every model-level field (opsets, functions, metadata) but the graph, so weights are not copied twice."""
    result = onnx.ModelProto()
    result.ir_version = model.ir_version
    result.producer_name = model.producer_name
    result.producer_version = model.producer_version
    result.domain = model.domain
    result.model_version = model.model_version
    result.doc_string = model.doc_string
    result.opset_import.extend(model.opset_import)
    result.metadata_props.extend(model.metadata_props)
    result.functions.extend(model.functions)
    return result
