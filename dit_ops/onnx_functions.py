"""Attach the ONNX function bodies of the dit_ops custom nodes to an exported model (torch-free).

`torch.onnx.export` leaves each dit_ops attention call as one custom node without a body (functions
produced by translations are inlined by the exporter, so bodies cannot ride along). This module appends
one FunctionProto per custom op type present, so ONNX Runtime inlines the body while TensorRT, seeing
`plugin_namespace` on the node, picks the dit_ops plugin instead.
"""

from __future__ import annotations

import onnx

from dit_ops import DOMAIN, OPSET_VERSION
from dit_ops.downsampled_attention.onnx_function import DownsampledAttention
from dit_ops.local_window_attention.onnx_function import LocalWindowAttention
from dit_ops.local_window_attention.onnx_function import function_proto as local_window_function
from dit_ops.local_window_attention.onnx_function import single_chunk

__all__ = ["BODIES", "MIN_OPSET", "function_proto", "attach_functions", "custom_nodes"]

BODIES = {"DownsampledAttention": DownsampledAttention, "LocalWindowAttention": LocalWindowAttention}
MIN_OPSET = 18  # the bodies are written against opset 18


def function_proto(op_type: str, opset_version: int, pooled: bool = True, chunked: bool = True) -> onnx.FunctionProto:
    """Body of `dit_ops::<op_type>` importing the default ONNX domain at `opset_version` (the model's).

    The bodies are written against opset 18; later versions of the ops they use only added types or
    attributes that act on other types (float8 casts, float16 Range), so re-labelling the import is
    exact, and the checker requires the function's default-domain version to equal the model's.
    """
    if op_type not in BODIES:
        raise ValueError(f"unknown dit_ops op type {op_type!r}; valid: {', '.join(BODIES)}")
    if opset_version < MIN_OPSET:
        raise ValueError(f"dit_ops function bodies need default opset >= {MIN_OPSET}, got {opset_version}")
    if op_type == "LocalWindowAttention":
        function = local_window_function(pooled, chunked)
    else:
        function = BODIES[op_type].to_function_proto()
    for entry in function.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = opset_version
    return function


def custom_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Every dit_ops node of the main graph (subgraphs and functions excluded)."""
    return [node for node in model.graph.node if node.domain == DOMAIN]


def attach_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Append (in place, and return) the FunctionProto of every dit_ops op type used by `model`.

    Idempotent: a body already present is replaced. Without any pooling node the local-attention body
    is the specialised one (same result, no empty pooled branch); where every local node fits one chunk
    of tiles, its Scan is unrolled. The default-domain opset of the bodies follows the
    model's. Typical use after `torch.onnx.export(..., custom_translation_table=dit_ops.translation_table())`:
    `model = dit_ops.attach_functions(onnx_program.model_proto)`.
    """
    default = [entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")]
    if not default:
        raise ValueError("model has no default-domain opset import")
    used = sorted({node.op_type for node in custom_nodes(model)})
    unknown = [name for name in used if name not in BODIES]
    if unknown:
        raise ValueError(f"no function body for dit_ops op(s) {unknown}; valid: {', '.join(BODIES)}")
    kept = [f for f in model.functions if not (f.domain == DOMAIN and f.name in used)]
    del model.functions[:]
    pooled = any(a.name == "down_factor" and a.i > 0 for n in custom_nodes(model) for a in n.attribute)
    local = [n for n in custom_nodes(model) if n.op_type == "LocalWindowAttention"]
    chunked = not all(single_chunk({a.name: a.i for a in n.attribute if a.type == a.INT}) for n in local)
    model.functions.extend(kept + [function_proto(name, default[0], pooled, chunked) for name in used])
    if used and not any(entry.domain == DOMAIN for entry in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, OPSET_VERSION))
    return model
