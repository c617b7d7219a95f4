"""ONNX translations of standard torch ops that the exporter uses instead of torchlib's defaults.

`F.scaled_dot_product_attention` without a mask: torchlib scales q and k by sqrt(scale) each and reads the
head size back from the graph at run time (Shape, Slice, Concat, Reshape around a second transpose of k), so
ONNX Runtime fuses only one of the two scales. Written as the textbook softmax((q * scale) k^T) v with a
constant scale, the transpose and the scale fuse into one FusedMatMul: per DiT-S/2 attention layer that
removes a transpose and a multiply over k and eight shape ops (~5% of an int8 step). Masked, causal,
dropout and grouped-query calls keep torchlib's translation.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from onnxscript import opset18 as op
from onnxscript.function_libs.torch_lib.ops import nn as torchlib_nn

__all__ = ["translation_table"]


def scaled_dot_product_attention(
    query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
    scale: float | None = None, enable_gqa: bool = False,
):
    plain = attn_mask is None and not is_causal and dropout_p == 0.0 and not enable_gqa
    known = query.shape is not None and key.shape is not None and len(key.shape) == len(query.shape)
    head_dim = query.shape[-1] if known else None
    if not plain or not isinstance(head_dim, int):
        return torchlib_nn.aten_scaled_dot_product_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa
        )
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    rank = len(query.shape)
    swap_last = [*range(rank - 2), rank - 1, rank - 2]
    # the scale goes on q, so an fp16 product already holds the final logits (the range softmax sees)
    scaled_query = op.Mul(query, op.CastLike(op.Constant(value_float=scale), query))
    logits = op.MatMul(scaled_query, op.Transpose(key, perm=swap_last))
    return op.MatMul(op.Softmax(logits, axis=-1), value)


def translation_table() -> dict[torch._ops.OpOverload, Callable]:
    """`custom_translation_table` entries for standard torch ops (merge with dit_ops' own)."""
    return {torch.ops.aten.scaled_dot_product_attention.default: scaled_dot_product_attention}
