"""torch -> ONNX with the dynamo exporter, and saving / checking models that may pass protobuf's 2 GB limit.

A serialized ModelProto cannot exceed 2 GiB, so large models (dit_xl_2, udit_l in fp32) keep their
weights in one external data file next to the .onnx; checks then go through the file path, which is
the only form onnx.checker accepts for such models.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import onnx
import onnx_ir
import onnx_ir.passes.common as ir_passes
import onnxscript.optimizer
import torch

MIN_OPSET = 18  # LayerNormalization as one node (opset 17) and torchlib's own opset (18)
try:
    from torch.onnx._constants import ONNX_MAX_OPSET as MAX_OPSET
except ImportError:  # private module moved: fall back to the highest opset torch 2.13 exports
    MAX_OPSET = 23
DEFAULT_OPSET = 20
# torchlib's optimizer folds constants of at most 8192 elements; weights used through a reshape or transpose
# (U-DiT's 1x1 convs applied as matrix products) need a larger limit to end up as plain initializers.
FOLD_LIMIT = 2**28
# Past this many bytes of tensor data the weights go to external data; the margin leaves room for
# the graph itself under protobuf's hard 2 GiB message limit.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**27

_ELEM_SIZE = {
    onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.BFLOAT16: 2,
    onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.INT64: 8, onnx.TensorProto.INT32: 4,
    onnx.TensorProto.INT16: 2, onnx.TensorProto.INT8: 1, onnx.TensorProto.UINT8: 1, onnx.TensorProto.BOOL: 1,
}
DTYPE_NAMES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
               onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32"}


def _optimize(model: onnx_ir.Model) -> None:
    """torch.onnx's default clean-up without its pattern rewriter: the rewriter's matching took ~40% of a
    U-DiT export (udit_b near the 120 s budget), and its rewrites (no-op casts, slice chains) are ones ONNX
    Runtime and TensorRT make themselves at load. Weight-only subgraphs fold into initializers."""
    ir_passes.InlinePass()(model)
    onnxscript.optimizer.fold_constants(model, input_size_limit=FOLD_LIMIT, output_size_limit=FOLD_LIMIT)
    ir_passes.RemoveUnusedNodesPass()(model)
    ir_passes.RemoveUnusedFunctionsPass()(model)
    ir_passes.RemoveUnusedOpsetsPass()(model)
    ir_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    ir_passes.DeduplicateInitializersPass()(model)
    ir_passes.CommonSubexpressionEliminationPass()(model)
    ir_passes.OutputFixPass()(model)
    ir_passes.NameFixPass()(model)


def check_opset(opset: int) -> int:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"unsupported opset {opset}: valid range is {MIN_OPSET}..{MAX_OPSET}")
    return opset


def export_module(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    opset: int,
    dynamic_batch: bool,
    custom_translation_table: dict | None = None,
) -> onnx.ModelProto:
    """Export `module(*args)` with torch.export + torchlib; dim 0 of every input is `batch` if dynamic."""
    check_opset(opset)
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=4096)
        dynamic_shapes = {name: {0: batch} for name in input_names}
    # torch logs one warning per optional torchvision op it cannot register: noise for our models
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        # torch warns that the shared "batch" name is reused for every input: that is the intent
        warnings.filterwarnings("ignore", message=".*axis name: batch will not be used.*")
        # torch.export copies its own pytree specs through an API torch itself deprecated: nothing to act on
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
        program = torch.onnx.export(
            module.eval(),
            args,
            dynamo=True,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            custom_translation_table=custom_translation_table,
            verbose=False,
            optimize=False,
        )
    _optimize(program.model)
    model = program.model_proto
    _name_batch_dims(model, dynamic_batch)
    return model


def _name_batch_dims(model: onnx.ModelProto, dynamic_batch: bool) -> None:
    """torch names the symbolic dim after its internal symbol (s0, ...); call it `batch` at the boundary."""
    if not dynamic_batch:
        return
    for value in [*model.graph.input, *model.graph.output]:
        dim = value.type.tensor_type.shape.dim[0]
        if dim.HasField("dim_param") or not dim.HasField("dim_value"):
            dim.dim_param = "batch"


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of weight data (initializers and Constant node tensors) without serializing the model."""
    def size(t: onnx.TensorProto) -> int:
        n = 1
        for d in t.dims:
            n *= d
        return n * _ELEM_SIZE.get(t.data_type, 8)

    total = sum(size(t) for t in model.graph.initializer)
    for node in model.graph.node:
        total += sum(size(a.t) for a in node.attribute if a.type == onnx.AttributeProto.TENSOR)
    return total


def save_model(model: onnx.ModelProto, path: str | Path, threshold: int = EXTERNAL_DATA_THRESHOLD) -> str | None:
    """Save `model`; weights go to `<name>.data` beside it when they pass `threshold` bytes.

    Returns the external data file name (relative to the model's directory) or None.
    """
    path = Path(path)
    if tensor_bytes(model) <= threshold:
        onnx.save_model(model, path)
        return None
    location = path.name + ".data"
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=1024)
    return location


def check_model(path: str | Path) -> None:
    """onnx.checker full check (type and shape inference included) through the path, external data or not."""
    onnx.checker.check_model(str(path), full_check=True)


def io_specs(values) -> list[dict]:
    """[{name, dtype, shape}] for graph inputs/outputs; symbolic dims keep their names."""
    specs = []
    for v in values:
        tt = v.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
        specs.append({"name": v.name, "dtype": DTYPE_NAMES.get(tt.elem_type, str(tt.elem_type)), "shape": shape})
    return specs
