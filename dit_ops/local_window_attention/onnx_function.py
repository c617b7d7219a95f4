"""dit_ops::LocalWindowAttention in ONNX: the torch.onnx translation (one custom node) and the onnxscript
function body that ONNX Runtime inlines (standard ops only, no extra library).

The body is the tile plan of `schema.TilePlan` rebuilt from the node attributes with Range arithmetic:
gather indices of the query tiles and of their haloed key windows, the per-tile disc mask and the
scatter-back index are all functions of constants, which ONNX Runtime folds at load. Attention runs over
chunks of tiles (a Scan, unrolled where one chunk holds every tile): per chunk Gather -> batched MatMul
over (batch, heads, tiles) -> masked Softmax -> MatMul, then one Gather puts the tiles back in token
order. Memory and time are linear in the number of tokens, never an N x N mask, and a chunk's logits stay
cache-sized, so the cost per token does not grow with the grid.

Pooled tokens (down_factor d > 0) are pooled from the first (grid_h / d) * [d > 0] patch rows and
appended to every key window, so with d = 0 the pooled tensors are empty (zero rows) and the same graph
is pure local attention, without touching the logits twice (`function_proto(pooled=False)` drops the
empty joins). Softmax and all arithmetic run in float32; the output is cast back to q's type.
"""

from __future__ import annotations

import onnx
from onnxscript import opset18 as op
from onnxscript import FLOAT, INT64, graph, script
from onnxscript.values import Op, Opset

from dit_ops.local_window_attention import schema

__all__ = ["OP_SCHEMA", "translate", "LocalWindowAttention", "function_proto"]

DIT_OPS = Opset(schema.DOMAIN, schema.OPSET_VERSION)
# Tiles run in chunks (a Scan) whose logits take about this many bytes per batch item, so the logits, mask
# and gathered windows of a chunk stay in cache: at a 128^2 grid (radius 8, one head) the whole-grid body
# ran 13.2-14.7 ms against 9.7 ms in 2 MiB chunks, and 9.6 vs 6.3 ms at a 32^2 grid with 6 heads, batch 2.
CHUNK_BYTES = 2 << 20


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
    # every tile sees all pooled tokens: appended to each window (B, H, 1, P, D), expanded per chunk
    pooled_shape = op.Concat(batch, heads, one, num_pooled, dim, axis=0)
    pooled_k = op.Reshape(op.ReduceSum(k_patches * weight, [3, 5], keepdims=0), pooled_shape, allowzero=1)
    pooled_v = op.Reshape(op.ReduceSum(v_patches * weight, [3, 5], keepdims=0), pooled_shape, allowzero=1)
    # pooled columns are never masked (constant Pad, folded at load)
    full_mask = op.Pad(mask, op.Concat(op.Constant(value_ints=[0, 0, 0, 0, 0]), num_pooled, axis=0))

    # --- chunks of tiles: a chunk's logits take about CHUNK_BYTES per batch item (constants folded at load)
    keys_per_query = window_size + num_pooled
    tiles = tiles_h * tiles_w
    logit_bytes = op.Constant(value_int=num_heads) * (th * tw) * (wh * ww + pooled_rows * pooled_cols) * 4
    per = op.Min(op.Max(CHUNK_BYTES / logit_bytes, 1), tiles)  # tiles per chunk
    chunks = (tiles + per - 1) / per
    tile_ids = op.Min(op.Range(0, chunks * per, 1), tiles - 1)  # the last chunk repeats the last tile
    per1 = op.Unsqueeze(per, [0])
    chunks1 = op.Unsqueeze(chunks, [0])
    chunk_queries = op.Reshape(
        op.Gather(op.Reshape(query_index, op.Concat(num_tiles, tile_size, axis=0)), tile_ids),
        op.Concat(chunks1, per1 * tile_size, axis=0),
    )
    chunk_keys = op.Reshape(
        op.Gather(op.Reshape(key_index, op.Concat(num_tiles, window_size, axis=0)), tile_ids),
        op.Concat(chunks1, per1 * window_size, axis=0),
    )
    chunk_masks = op.Reshape(
        op.Gather(full_mask, tile_ids), op.Concat(chunks1, per1, tile_size, keys_per_query, axis=0)
    )
    chunk_tile_shape = op.Concat(batch, heads, per1, tile_size, dim, axis=0)
    chunk_window_shape = op.Concat(batch, heads, per1, window_size, dim, axis=0)
    chunk_pooled_shape = op.Concat(batch, heads, per1, num_pooled, dim, axis=0)
    chunk_out_shape = op.Concat(batch, heads, per1 * tile_size, dim, axis=0)

    # --- per chunk: one softmax over window + pooled tokens
    @graph()
    def attend(queries: INT64["Q"], keys: INT64["K"], chunk_mask: FLOAT["T", "Tq", "Tk"]) -> FLOAT["B", "H", "M", "D"]:
        q_tiles = op.Reshape(op.Gather(qf, queries, axis=2), chunk_tile_shape)
        k_window = op.Reshape(op.Gather(kf, keys, axis=2), chunk_window_shape)
        v_window = op.Reshape(op.Gather(vf, keys, axis=2), chunk_window_shape)
        k_tiles = op.Concat(k_window, op.Expand(pooled_k, chunk_pooled_shape), axis=3)
        v_tiles = op.Concat(v_window, op.Expand(pooled_v, chunk_pooled_shape), axis=3)
        logits = op.MatMul(q_tiles, op.Transpose(k_tiles, perm=[0, 1, 2, 4, 3])) + chunk_mask
        chunk_out = op.Reshape(op.MatMul(op.Softmax(logits, axis=-1), v_tiles), chunk_out_shape)
        return chunk_out

    # --- chunks back in tile order (B, H, chunks * per * Tq, D), then scatter the tiles back to token order
    stacked = op.Scan(chunk_queries, chunk_keys, chunk_masks, body=attend, num_scan_inputs=3)
    out = op.Reshape(
        op.Transpose(stacked, perm=[1, 2, 0, 3, 4]), op.Concat(batch, heads, chunks1 * per1 * tile_size, dim, axis=0)
    )
    return op.CastLike(op.Gather(out, out_index, axis=2), q)


# Element types of the values the per-chunk Scan body reads from the enclosing function. ONNX Runtime infers
# a function node's outputs from its body, and that inference gives a subgraph no outer-scope types, so the
# body declares them (value_info) or the model fails to load.
_OUTER_SCOPE_TYPES = {
    "qf": onnx.TensorProto.FLOAT, "kf": onnx.TensorProto.FLOAT, "vf": onnx.TensorProto.FLOAT,
    "pooled_k": onnx.TensorProto.FLOAT, "pooled_v": onnx.TensorProto.FLOAT,
    "chunk_tile_shape": onnx.TensorProto.INT64, "chunk_window_shape": onnx.TensorProto.INT64,
    "chunk_pooled_shape": onnx.TensorProto.INT64, "chunk_out_shape": onnx.TensorProto.INT64,
}
# Joins that only append pooled tokens (value -> its window input): with down_factor = 0 they are empty,
# yet ONNX Runtime still copies every key window through the Concat (~15% of the body's time).
_POOLED_JOINS = {"full_mask": "mask"}
_POOLED_JOINS_PER_CHUNK = {"k_tiles": "k_window", "v_tiles": "v_window"}


def function_proto(pooled: bool = True, chunked: bool = True) -> onnx.FunctionProto:
    """The body as a FunctionProto: outer-scope types declared, and without `pooled` the pooled-token joins
    replaced by their window input and the dead pooling nodes removed (same result for down_factor = 0).

    Without `chunked` the Scan is unrolled into its single iteration: same result where every node fits one
    chunk (see `single_chunk`), without the Scan's ~50 us per call (2% of a CLEAR DiT-S/2 step at 16^2 tokens).
    """
    function = LocalWindowAttention.to_function_proto()
    body = _chunk_body(function)
    if not pooled:
        _bypass(function.node, _POOLED_JOINS)
        _bypass(body.node, _POOLED_JOINS_PER_CHUNK)
        _keep_needed(body.node, [value.name for value in body.output])
        _keep_needed(function.node, list(function.output))
    outer = sorted(_outer_scope_names(body))
    unknown = [name for name in outer if name not in _OUTER_SCOPE_TYPES]
    if unknown:
        raise RuntimeError(f"LocalWindowAttention chunk body reads {unknown} with no declared type")
    body.value_info.extend(onnx.helper.make_tensor_value_info(name, _OUTER_SCOPE_TYPES[name], None) for name in outer)
    if not chunked:
        _unroll_single_chunk(function)
    return function


def single_chunk(attributes: dict[str, int]) -> bool:
    """Whether a node with these attributes runs all its tiles in one chunk (the body's own arithmetic)."""
    plan = schema.TilePlan(attributes["grid_h"], attributes["grid_w"], attributes["radius"], attributes["tile_h"],
                           attributes["tile_w"])
    d = attributes["down_factor"]
    pooled = (attributes["grid_h"] // d) * (attributes["grid_w"] // d) if d > 0 else 0
    keys_per_query = attributes["window_h"] * attributes["window_w"] + pooled
    logit_bytes = attributes["num_heads"] * plan.tile_size * keys_per_query * 4
    return plan.num_tiles <= max(CHUNK_BYTES // logit_bytes, 1)


def _unroll_single_chunk(function: onnx.FunctionProto) -> None:
    """Replace the Scan by its body run once: inputs squeezed from the chunk axis, output unsqueezed into it."""
    [index] = [i for i, node in enumerate(function.node) if node.op_type == "Scan"]
    scan, body = function.node[index], _chunk_body(function)
    local = {value.name for value in body.input} | {name for node in body.node for name in node.output}
    renamed = {name: f"chunk/{name}" for name in local}  # no clash with the function's own names
    axis = "chunk/axis"
    unrolled = [onnx.helper.make_node("Constant", [], [axis], value_ints=[0])]
    unrolled += [onnx.helper.make_node("Squeeze", [source, axis], [renamed[value.name]])
                 for source, value in zip(scan.input, body.input)]
    for node in body.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[:] = [renamed.get(name, name) for name in node.input]
        copy.output[:] = [renamed[name] for name in node.output]
        copy.name = f"chunk/{node.name}" if node.name else ""
        unrolled.append(copy)
    unrolled.append(onnx.helper.make_node("Unsqueeze", [renamed[body.output[0].name], axis], [scan.output[0]]))
    nodes = list(function.node)
    del function.node[:]
    function.node.extend(nodes[:index] + unrolled + nodes[index + 1:])


def _chunk_body(function: onnx.FunctionProto) -> onnx.GraphProto:
    [scan] = [node for node in function.node if node.op_type == "Scan"]
    return next(attribute.g for attribute in scan.attribute if attribute.name == "body")


def _bypass(nodes, joins: dict[str, str]) -> None:
    for node in nodes:
        if node.output[0] in joins:
            source = joins[node.output[0]]
            if source not in node.input:
                raise RuntimeError(f"LocalWindowAttention body changed: {node.output[0]} no longer joins {source}")
            node.op_type, node.input[:] = "Identity", [source]
            del node.attribute[:]


def _outer_scope_names(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads without defining them."""
    local = {value.name for value in graph.input} | {t.name for t in graph.initializer}
    local |= {name for node in graph.node for name in node.output}
    read = {name for node in graph.node for name in node.input} | _subgraph_reads(graph.node)
    return {name for name in read if name and name not in local}


def _subgraph_reads(nodes) -> set[str]:
    return {
        name for node in nodes for attribute in node.attribute if attribute.type == onnx.AttributeProto.GRAPH
        for name in _outer_scope_names(attribute.g)
    }


def _keep_needed(nodes, outputs: list[str]) -> None:
    """Drop the nodes none of `outputs` depends on (a node's subgraph reads count as its inputs)."""
    needed, kept = set(outputs), []
    for node in reversed(nodes):
        if any(name in needed for name in node.output):
            kept.append(node)
            needed.update(node.input)
            needed |= _subgraph_reads([node])
    del nodes[:]
    nodes.extend(reversed(kept))
