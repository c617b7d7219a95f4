"""dit_ops::LocalWindowAttention in ONNX: the torch.onnx translation (one custom node) and the onnxscript
function body that ONNX Runtime inlines (standard ops only, no extra library).

The body is the tile plan of `schema.TilePlan` rebuilt from the node attributes with Range arithmetic:
gather indices of the query tiles and of their haloed key windows, the per-tile disc mask and the
scatter-back index are all functions of constants, which ONNX Runtime folds at load. Attention then is
Gather -> batched MatMul over (batch, heads, tiles) -> masked Softmax -> MatMul -> Gather: memory and
time linear in the number of tokens, never an N x N mask.

Pooled tokens (down_factor d > 0) are pooled from the first (grid_h / d) * [d > 0] patch rows and
appended to every key window, so with d = 0 the pooled tensors are empty (zero rows) and the same graph
is pure local attention, without control flow and without touching the logits twice. Softmax and all
arithmetic run in float32; the output is cast back to q's type.
"""

from __future__ import annotations

import onnx
from onnxscript import opset18 as op
from onnxscript import script
from onnxscript.values import Op, Opset

from dit_ops.local_window_attention import schema

__all__ = ["OP_SCHEMA", "translate", "LocalWindowAttention"]

DIT_OPS = Opset(schema.DOMAIN, schema.OPSET_VERSION)


def _make_schema() -> onnx.defs.OpSchema:
    """OpSchema of the node for the exporter's tracer (not registered globally)."""
    tensor = onnx.defs.OpSchema.FormalParameter
    attr = onnx.defs.OpSchema.Attribute
    ints, string = onnx.defs.OpSchema.AttrType.INT, onnx.defs.OpSchema.AttrType.STRING
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    return onnx.defs.OpSchema(
        schema.OP_TYPE, schema.DOMAIN, schema.OPSET_VERSION, "CLEAR local-window attention",
        inputs=[tensor("q", "T"), tensor("k", "T"), tensor("v", "T"), tensor("scale", "S"), tensor("pool_weight", "S")],
        outputs=[tensor("out", "T")],
        type_constraints=[("T", floats, "activations"), ("S", floats, "per-head scale and pooling weights")],
        attributes=[attr(name, ints, name) for name in schema.ATTRIBUTES]
        + [attr("plugin_namespace", string, "TensorRT plugin namespace"),
           attr("plugin_version", string, "TensorRT plugin version")],
    )


OP_SCHEMA = _make_schema()
_NODE = Op(DIT_OPS, schema.OP_TYPE, OP_SCHEMA)


def translate(q, k, v, scale, pool_weight, grid_h: int, grid_w: int, radius: int, down_factor: int):
    """torch.onnx translation of `dit_ops::local_window_attention`: one LocalWindowAttention node.

    Without pooled tokens the node still gets a pool_weight input (a (1,) constant of scale's type), so
    the node arity is fixed for the function body and the TensorRT plugin.
    """
    _, heads, _, head_dim = q.shape
    attrs = schema.node_attributes(int(heads), int(head_dim), grid_h, grid_w, radius, down_factor)
    if pool_weight is None:
        pool_weight = op.CastLike(op.Constant(value_floats=[1.0]), scale)
    return _NODE(q, k, v, scale, pool_weight, **attrs)


@script(DIT_OPS, default_opset=op)
def LocalWindowAttention(
    q, k, v, scale, pool_weight, num_heads: int, head_dim: int, grid_h: int, grid_w: int, radius: int,
    down_factor: int, tile_h: int, tile_w: int, window_h: int, window_w: int,
):
    # --- tile plan from the attributes (int64), folded to constants by ONNX Runtime
    gh = op.Constant(value_int=grid_h)
    gw = op.Constant(value_int=grid_w)
    th = op.Constant(value_int=tile_h)
    tw = op.Constant(value_int=tile_w)
    wh = op.Constant(value_int=window_h)
    ww = op.Constant(value_int=window_w)
    r = op.Constant(value_int=radius)
    tiles_h = (gh + th - 1) / th
    tiles_w = (gw + tw - 1) / tw
    # tile starts clamped inside the grid (the last tile overlaps), windows = tile + halo clamped inside
    query_y = op.Min(op.Range(0, tiles_h, 1) * th, gh - th)
    query_x = op.Min(op.Range(0, tiles_w, 1) * tw, gw - tw)
    key_y = op.Max(op.Min(query_y - op.Min(r - 1, gh - 1), gh - wh), 0)
    key_x = op.Max(op.Min(query_x - op.Min(r - 1, gw - 1), gw - ww), 0)
    rows_q = op.Unsqueeze(query_y, [1]) + op.Range(0, th, 1)  # (tiles_h, tile_h)
    cols_q = op.Unsqueeze(query_x, [1]) + op.Range(0, tw, 1)  # (tiles_w, tile_w)
    rows_k = op.Unsqueeze(key_y, [1]) + op.Range(0, wh, 1)  # (tiles_h, window_h)
    cols_k = op.Unsqueeze(key_x, [1]) + op.Range(0, ww, 1)  # (tiles_w, window_w)
    # token indices laid out (tiles_h, tiles_w, h, w), flattened
    query_index = op.Reshape(op.Unsqueeze(rows_q, [1, 3]) * gw + op.Unsqueeze(cols_q, [0, 2]), [-1])
    key_index = op.Reshape(op.Unsqueeze(rows_k, [1, 3]) * gw + op.Unsqueeze(cols_k, [0, 2]), [-1])
    # disc mask (tiles, Tq, Tk): (yq - yk)^2 + (xq - xk)^2 < radius^2
    dy = op.Unsqueeze(rows_q, [2]) - op.Unsqueeze(rows_k, [1])  # (tiles_h, tile_h, window_h)
    dx = op.Unsqueeze(cols_q, [2]) - op.Unsqueeze(cols_k, [1])  # (tiles_w, tile_w, window_w)
    dist2 = op.Unsqueeze(dy * dy, [1, 3, 5]) + op.Unsqueeze(dx * dx, [0, 2, 4])
    num_tiles = op.Unsqueeze(tiles_h * tiles_w, [0])
    tile_size = op.Unsqueeze(th * tw, [0])
    window_size = op.Unsqueeze(wh * ww, [0])
    mask = op.Reshape(
        op.Where(op.Less(dist2, r * r), op.Constant(value_float=0.0), op.Constant(value_float=float("-inf"))),
        op.Concat(num_tiles, tile_size, window_size, axis=0),
    )
    # each token's row in the (tiles * Tq) outputs: its tile (the later one where tiles overlap) and offset
    y = op.Range(0, gh, 1)
    x = op.Range(0, gw, 1)
    tile_y = op.Min(y / th, tiles_h - 1)
    tile_x = op.Min(x / tw, tiles_w - 1)
    offset_y = y - op.Gather(query_y, tile_y)
    offset_x = x - op.Gather(query_x, tile_x)
    tile_of = op.Unsqueeze(tile_y * tiles_w, [1]) + op.Unsqueeze(tile_x, [0])
    out_index = op.Reshape(
        tile_of * (th * tw) + op.Unsqueeze(offset_y * tw, [1]) + op.Unsqueeze(offset_x, [0]), [-1]
    )

    # --- gather tiles (float32): q (B, H, tiles, Tq, D), k and v (B, H, tiles, Tk, D)
    batch = op.Shape(q, start=0, end=1)
    heads = op.Unsqueeze(op.Constant(value_int=num_heads), [0])
    dim = op.Unsqueeze(op.Constant(value_int=head_dim), [0])
    qf = op.Cast(q, to=1) * op.Reshape(op.Cast(scale, to=1), [-1, 1, 1])
    kf = op.Cast(k, to=1)
    vf = op.Cast(v, to=1)
    tile_shape = op.Concat(batch, heads, num_tiles, tile_size, dim, axis=0)
    q_tiles = op.Reshape(op.Gather(qf, query_index, axis=2), tile_shape)
    window_shape = op.Concat(batch, heads, num_tiles, window_size, dim, axis=0)
    k_tiles = op.Reshape(op.Gather(kf, key_index, axis=2), window_shape)
    v_tiles = op.Reshape(op.Gather(vf, key_index, axis=2), window_shape)

    # --- pooled tokens (B, H, P, D): weighted d x d patch sums; P = 0 when down_factor = 0
    d = op.Constant(value_int=down_factor)
    patch = op.Max(d, 1)
    pooled_rows = (gh / patch) * op.Min(d, 1)
    pooled_cols = gw / patch
    patch1 = op.Unsqueeze(patch, [0])
    one = op.Constant(value_ints=[1])
    grid_shape = op.Concat(batch, heads, op.Unsqueeze(gh, [0]), op.Unsqueeze(gw, [0]), dim, axis=0)
    patch_shape = op.Concat(
        batch, heads, op.Unsqueeze(pooled_rows, [0]), patch1, op.Unsqueeze(pooled_cols, [0]), patch1, dim, axis=0
    )
    num_pooled = op.Unsqueeze(pooled_rows * pooled_cols, [0])
    used_rows = op.Unsqueeze(pooled_rows * patch, [0])
    weight = op.Reshape(op.Cast(pool_weight, to=1), op.Concat(patch1, one, patch1, one, axis=0))
    k_patches = op.Reshape(op.Slice(op.Reshape(kf, grid_shape), [0], used_rows, [2]), patch_shape, allowzero=1)
    v_patches = op.Reshape(op.Slice(op.Reshape(vf, grid_shape), [0], used_rows, [2]), patch_shape, allowzero=1)
    # every tile sees all pooled tokens: append them to each window (B, H, tiles, Tk + P, D)
    pooled_shape = op.Concat(batch, heads, one, num_pooled, dim, axis=0)
    tiled_shape = op.Concat(batch, heads, num_tiles, num_pooled, dim, axis=0)
    pooled_k = op.Reshape(op.ReduceSum(k_patches * weight, [3, 5], keepdims=0), pooled_shape, allowzero=1)
    pooled_v = op.Reshape(op.ReduceSum(v_patches * weight, [3, 5], keepdims=0), pooled_shape, allowzero=1)
    keys = op.Concat(k_tiles, op.Expand(pooled_k, tiled_shape), axis=3)
    values = op.Concat(v_tiles, op.Expand(pooled_v, tiled_shape), axis=3)
    # pooled columns are never masked (constant Pad, folded at load)
    full_mask = op.Pad(mask, op.Concat(op.Constant(value_ints=[0, 0, 0, 0, 0]), num_pooled, axis=0))

    # --- one softmax over window + pooled tokens, then scatter the tiles back to token order
    logits = op.MatMul(q_tiles, op.Transpose(keys, perm=[0, 1, 2, 4, 3])) + full_mask
    out = op.MatMul(op.Softmax(logits, axis=-1), values)
    out = op.Reshape(out, op.Concat(batch, heads, num_tiles * tile_size, dim, axis=0))
    return op.CastLike(op.Gather(out, out_index, axis=2), q)
