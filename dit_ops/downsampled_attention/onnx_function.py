"""dit_ops::DownsampledAttention in ONNX: the torch.onnx translation (one custom node) and the onnxscript
function body that ONNX Runtime inlines (standard ops only, no extra library).

The body is driven by the node attributes only, so one FunctionProto serves every node of a model
(U-DiT stages differ in grid and head_dim). `rope` and `cosine` are blended arithmetically instead of
branching (rope off = zero angles, cosine off = a 0/1 flag weighting two per-token factors), so the graph has no control
flow and ONNX Runtime folds every table (cos/sin, flags) into constants at load. Softmax and all
arithmetic run in float32 whatever the input type; the output is cast back to q's type.
"""

from __future__ import annotations

import onnx
from onnxscript import opset18 as op
from onnxscript import script
from onnxscript.values import Op, Opset

from dit_ops.downsampled_attention import schema

__all__ = ["OP_SCHEMA", "translate", "DownsampledAttention"]

DIT_OPS = Opset(schema.DOMAIN, schema.OPSET_VERSION)


def _make_schema() -> onnx.defs.OpSchema:
    """OpSchema of the node for the exporter's tracer (not registered globally)."""
    tensor = onnx.defs.OpSchema.FormalParameter
    attr = onnx.defs.OpSchema.Attribute
    ints, string = onnx.defs.OpSchema.AttrType.INT, onnx.defs.OpSchema.AttrType.STRING
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    return onnx.defs.OpSchema(
        schema.OP_TYPE, schema.DOMAIN, schema.OPSET_VERSION, "U-DiT downsampled-token attention",
        inputs=[tensor("q", "T"), tensor("k", "T"), tensor("v", "T"), tensor("logit_scale", "S")],
        outputs=[tensor("out", "T")],
        type_constraints=[("T", floats, "activations"), ("S", floats, "per-head log temperature")],
        attributes=[attr(name, ints, name) for name in schema.ATTRIBUTES]
        + [attr("plugin_namespace", string, "TensorRT plugin namespace"),
           attr("plugin_version", string, "TensorRT plugin version")],
    )


OP_SCHEMA = _make_schema()
_NODE = Op(DIT_OPS, schema.OP_TYPE, OP_SCHEMA)


def translate(q, k, v, logit_scale, grid_h: int, grid_w: int, rope: bool, cosine: bool):
    """torch.onnx translation of `dit_ops::downsampled_attention`: one DownsampledAttention node."""
    _, heads, _, head_dim = q.shape
    attrs = schema.node_attributes(int(heads), int(head_dim), grid_h, grid_w, rope, cosine)
    return _NODE(q, k, v, logit_scale, **attrs)


@script(DIT_OPS, default_opset=op)
def DownsampledAttention(
    q, k, v, logit_scale, num_heads: int, head_dim: int, grid_h: int, grid_w: int, rope: int, cosine: int
):
    # --- sizes from the attributes only, so every shape folds to a constant at load (no Shape of the
    # dynamic batch at run time); a 0 in Reshape's shape keeps that dim, here batch and heads
    keep = op.Constant(value_ints=[0, 0])
    dim = op.Constant(value_int=head_dim)
    dim1 = op.Unsqueeze(dim, [0])
    half_h1 = op.Unsqueeze(op.Constant(value_int=grid_h) / 2, [0])
    half_w = op.Constant(value_int=grid_w) / 2
    half_w1 = op.Unsqueeze(half_w, [0])
    tokens = half_h1 * half_w1  # per group
    two = op.Constant(value_ints=[2])
    split_shape = op.Concat(keep, half_h1, two, half_w1, two, dim1, axis=0)
    group_shape = op.Concat(keep, op.Constant(value_ints=[4]), tokens, dim1, axis=0)

    # --- (B, H, N, D) -> (B, H, 4, N/4, D): group 2i+j holds pixels (2a+i, 2b+j); float32 from here on
    qg = op.Reshape(op.Transpose(op.Reshape(op.Cast(q, to=1), split_shape), perm=[0, 1, 3, 5, 2, 4, 6]), group_shape)
    kg = op.Reshape(op.Transpose(op.Reshape(op.Cast(k, to=1), split_shape), perm=[0, 1, 3, 5, 2, 4, 6]), group_shape)
    vg = op.Reshape(op.Transpose(op.Reshape(op.Cast(v, to=1), split_shape), perm=[0, 1, 3, 5, 2, 4, 6]), group_shape)

    # --- RoPE2D tables (tokens, D): pair m = c // 2 rotates by col * f_{m//2} (m even) or row * f_{m//2} (m odd)
    channel = op.Range(0, dim, 1)
    pair = channel / 2
    exponent = op.Cast((pair / 2) * 4, to=1) / op.Cast(dim, to=1)  # 4i / D
    freq = op.Reciprocal(op.Pow(op.Constant(value_float=schema.ROPE_THETA), exponent))
    n = op.Range(0, op.Squeeze(tokens, [0]), 1)
    col = op.Cast(op.Unsqueeze(op.Mod(n, half_w), [1]), to=1)
    row = op.Cast(op.Unsqueeze(n / half_w, [1]), to=1)
    position = op.Where(op.Equal(op.Mod(pair, 2), 0), col, row)
    angle = position * freq * op.Cast(op.Constant(value_int=rope), to=1)  # rope off: zero angle = identity
    cos = op.Cos(angle)
    sin = op.Sin(angle)
    # i * (a + ib) = -b + ia on each pair, as one product with a constant signed permutation (swap[j, c] =
    # sign_c where j = partner_c): a (D x D) MatMul is far cheaper in ONNX Runtime than a Gather on the last axis
    parity = op.Mod(channel, 2)
    partner = op.Min(channel + 1 - 2 * parity, dim - 1)
    sign = op.Cast(2 * parity - 1, to=1)
    swap = op.Cast(op.Equal(op.Unsqueeze(channel, [1]), op.Unsqueeze(partner, [0])), to=1) * sign
    qr = qg * cos + op.MatMul(qg, swap) * sin
    kr = kg * cos + op.MatMul(kg, swap) * sin

    # --- logits: cosine * exp(min(logit_scale, ln 100)), or q.k / sqrt(D). The `cosine` flag blends the two
    # per-token factors (shape (..., 1)), so each of q and k gets one full-size Mul and no Where
    eps = op.Constant(value_float=1e-12)
    temperature = op.Exp(op.Min(op.Cast(logit_scale, to=1), op.Constant(value_float=schema.MAX_LOGIT_SCALE)))
    is_cosine = op.Cast(op.Constant(value_int=cosine), to=1)
    # Clip(min=eps) is max(norm, eps); ONNX Runtime's broadcasting Max took 2-3x as long on these (..., 1) norms
    inv_norm_q = op.Reciprocal(op.Clip(op.ReduceL2(qr, [-1], keepdims=1), eps))
    inv_norm_k = op.Reciprocal(op.Clip(op.ReduceL2(kr, [-1], keepdims=1), eps))
    plain_scale = op.Reciprocal(op.Sqrt(op.Cast(dim, to=1)))
    q_factor = is_cosine * op.Reshape(temperature, [-1, 1, 1, 1]) * inv_norm_q + (1.0 - is_cosine) * plain_scale
    k_factor = is_cosine * inv_norm_k + (1.0 - is_cosine)
    q_final = qr * q_factor
    k_final = kr * k_factor

    # --- softmax attention per (batch, head, group), then merge the groups back
    probs = op.Softmax(op.MatMul(q_final, op.Transpose(k_final, perm=[0, 1, 2, 4, 3])), axis=-1)
    out = op.MatMul(probs, vg)
    merged_shape = op.Concat(keep, two, two, half_h1, half_w1, dim1, axis=0)
    out_shape = op.Concat(keep, tokens * 4, dim1, axis=0)
    out = op.Reshape(op.Transpose(op.Reshape(out, merged_shape), perm=[0, 1, 4, 2, 5, 3, 6]), out_shape)
    return op.CastLike(out, q)

