"""torch.onnx translation table of the dit_ops custom ops (imports torch).

Exact call used by the exporter::

    import dit_ops
    program = torch.onnx.export(model, args, dynamo=True, opset_version=opset,
                                custom_translation_table=dit_ops.translation_table())
    model_proto = dit_ops.attach_functions(program.model_proto)

Each `dit_ops::<op>` call becomes one node `dit_ops::DownsampledAttention` / `dit_ops::LocalWindowAttention`
carrying its attributes and `plugin_namespace="dit_ops"`, `plugin_version="1"`; `attach_functions` then
appends the ONNX function bodies ONNX Runtime needs.
"""

from __future__ import annotations

from typing import Callable

import torch

from dit_ops.downsampled_attention import onnx_function as downsampled_onnx
from dit_ops.downsampled_attention import reference as _downsampled_reference  # noqa: F401  registers the op
from dit_ops.local_window_attention import onnx_function as local_onnx
from dit_ops.local_window_attention import reference as _local_reference  # noqa: F401  registers the op

__all__ = ["translation_table"]


def translation_table() -> dict[torch._ops.OpOverload, Callable]:
    """`custom_translation_table` mapping each dit_ops torch op to its one-node ONNX translation."""
    return {
        torch.ops.dit_ops.downsampled_attention.default: downsampled_onnx.translate,
        torch.ops.dit_ops.local_window_attention.default: local_onnx.translate,
    }
