"""Write symmetric Q/DQ denoisers (INT8 through ONNX Runtime's quantizer, FP8 by direct insertion).

Both follow NVIDIA's diffusion recipe: only the heavy linear layers (MatMul / Conv / Gemm) are
quantized; the timestep and label embedders, the adaLN modulation, the patch embedding and the final
layer stay in float, and the `dit_ops` attention nodes keep their float function bodies. Zero points are
all 0 because TensorRT only takes symmetric quantization.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

QUANTIZED_OP_TYPES = ("MatMul", "Conv", "Gemm")
# Module-path fragments whose layers hurt quality when quantized (NVIDIA's filter_func, in DiT names).
FLOAT_SCOPES = ("t_embedder", "y_embedder", "x_embedder", "adaLN_modulation", "final_layer", "pos_embed")
FP8_E4M3_MAX = 448.0
MIN_FP8_OPSET = 19


def module_path(node: onnx.NodeProto) -> str:
    """The innermost PyTorch module path the dynamo exporter recorded for a node ('' if unknown)."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = [s.strip(" '\"") for s in prop.value.strip("[]").split(",")]
            return max(scopes, key=len) if scopes else ""
    return ""


def weight_layers(model: onnx.ModelProto) -> list[str]:
    """MatMul / Conv / Gemm nodes whose second input is a stored weight.

    Activation x activation products (q @ k^T, softmax @ v) stay float: with Q/DQ on q, k, P and v the
    dit_s_2 int8 step was no faster on CPU (1.00x side by side), the probabilities would keep 7 bits, and
    it is NVIDIA's most aggressive level, not its default.
    """
    weights = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in QUANTIZED_OP_TYPES and n.input[1] in weights]


def float_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of quantizable nodes that must stay in float."""
    return [
        n.name
        for n in model.graph.node
        if n.op_type in QUANTIZED_OP_TYPES and any(s in module_path(n) for s in FLOAT_SCOPES)
    ]


def quantize_int8(
    fp32_path: Path, out_path: Path, amax: dict[str, float], *, exclude: list[str], per_channel: bool = True
) -> None:
    """INT8 Q/DQ with our own (timestep-aware) activation ranges fed to ONNX Runtime's quantizer as a cache."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorsData, save_tensors_data

    layers = weight_layers(onnx.load(str(fp32_path), load_external_data=False))
    ranges = {
        name: (np.array(-a, dtype=np.float32), np.array(a, dtype=np.float32)) for name, a in amax.items()
    }
    with tempfile.TemporaryDirectory(prefix="dit-edge-calib.") as tmp, _without_preprocess_advice():
        cache = Path(tmp) / "ranges.json"
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, ranges), cache)
        quantize_static(
            str(fp32_path),
            str(out_path),
            calibration_data_reader=None,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OP_TYPES),
            per_channel=per_channel,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=[n for n in layers if n not in set(exclude)],
            nodes_to_exclude=exclude,
            calibrate_method=CalibrationMethod.MinMax,
            calibration_cache_path=cache,
            extra_options={
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                # TensorRT rejects int32 bias Q/DQ; a float bias Add costs nothing.
                "QuantizeBias": False,
                # MatMul / Gemm: Q/DQ on the inputs only, as NVIDIA's recipe; a float output lets ONNX Runtime
                # fuse DQ -> MatMul into MatMulIntegerToFloat instead of requantizing and dequantizing again.
                # Conv keeps its output Q/DQ: ONNX Runtime has no integer Conv with a float output, and without
                # it the Conv would run in float on weights dequantized at every call.
                "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"],
                # one Q/DQ pair per consumer: ONNX Runtime fuses a DQ -> MatMul only when the DQ has a single
                # consumer (q, k, v projections share their input; see runtime.sessions.DISABLED_OPTIMIZERS)
                "DedicatedQDQPair": True,
                "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
            },
        )


@contextlib.contextmanager
def _without_preprocess_advice() -> Iterator[None]:
    """ONNX Runtime's quantizer advises (twice, on the root logger) running its pre-processing (shape inference,
    graph optimization): the exporter's graph comes constant-folded with its shapes, and the report checks quality."""
    def advice(record: logging.LogRecord) -> bool:
        return "pre-process" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)


def _raise_opset(model: onnx.ModelProto, version: int) -> None:
    """FP8 Q/DQ needs opset 19; 18 -> 19 changed no semantics of the ops our exporter emits."""
    for imports in [model.opset_import, *[f.opset_import for f in model.functions]]:
        for entry in imports:
            if entry.domain in ("", "ai.onnx") and entry.version < version:
                entry.version = version


def quantize_fp8(fp32_path: Path, out_path: Path, amax: dict[str, float], *, exclude: list[str]) -> int:
    """FP8 (E4M3) Q/DQ for TensorRT: per-tensor activations, per-channel weights. Returns the node count."""
    model = onnx.load(str(fp32_path))
    _raise_opset(model, MIN_FP8_OPSET)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    excluded = set(exclude)
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    count = 0

    def qdq(tensor: str, scale: np.ndarray, axis: int | None, tag: str) -> str:
        scale_name, zp_name, q_name, dq_name = (f"{tag}_{s}" for s in ("scale", "zp", "q", "dq"))
        new_inits.append(numpy_helper.from_array(scale.astype(np.float32), scale_name))
        zp = helper.make_tensor(zp_name, TensorProto.FLOAT8E4M3FN, scale.shape, np.zeros(scale.size).tolist())
        new_inits.append(zp)
        kwargs = {} if axis is None else {"axis": axis}
        new_nodes.append(helper.make_node("QuantizeLinear", [tensor, scale_name, zp_name], [q_name], **kwargs))
        new_nodes.append(helper.make_node("DequantizeLinear", [q_name, scale_name, zp_name], [dq_name], **kwargs))
        return dq_name

    for node in graph.node:
        if node.op_type in QUANTIZED_OP_TYPES and node.name not in excluded:
            activation, weight = node.input[0], node.input[1]
            if weight in inits and activation in amax:
                w = numpy_helper.to_array(inits[weight])
                axis = 1 if node.op_type == "MatMul" else 0
                reduce_axes = tuple(i for i in range(w.ndim) if i != axis)
                w_scale = np.maximum(np.abs(w).max(axis=reduce_axes), 1e-12) / FP8_E4M3_MAX
                a_scale = np.array(max(amax[activation], 1e-12) / FP8_E4M3_MAX)
                node.input[0] = qdq(activation, a_scale, None, f"{node.name}_act")
                node.input[1] = qdq(weight, w_scale, axis, f"{node.name}_w")
                count += 1
        new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(out_path))
    return count
