"""Triton kernel for dit_ops::LocalWindowAttention (CLEAR), used by the TensorRT plugin.

One program per (query tile, batch * head). Queries are a 2-D tile_h x tile_w tile of the row-major
token grid, read in place by strided addressing (no token permutation). The program walks the key tiles
(same tile shape) of its haloed window, skips every key tile whose nearest pair is at distance >= radius,
computes the disc mask inside the tile and keeps an fp32 online softmax. With down_factor d > 0 it then
walks the (grid_h/d)(grid_w/d) pooled tokens, pooling k and v over the d x d patches on the fly, so the
whole op is one kernel (TensorRT AOT plugins launch exactly one).

2-D tiles matter: with 1-D blocks of the flattened sequence a query block spans whole rows and touches
3-4x more key blocks than a 2-D tile does at 4K-8K (specs: clear_local_attention.md section 2).
`visited_tiles` counts the key tiles the kernel computes with the kernel's exact skip rule.

The kernel module imports triton; the torch-free runtime never imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import triton
import triton.language as tl

from dit_ops.local_window_attention import schema

__all__ = [
    "PLUGIN_ID", "PLUGIN_ATTRIBUTES", "TileConfig", "default_config", "visited_tiles", "dense_tiles",
    "launch_grid", "head_dim_padded", "compile_kernel", "kernel_arguments", "local_window_attention",
    "KernelCost", "cost_per_call",
]

DTYPES = ("fp16", "fp32")  # element types the kernel is built for
PLUGIN_ID = f"{schema.DOMAIN}::{schema.OP_TYPE}"
# Node attributes the TensorRT plugin declares (the parser passes only these; the tile plan attributes
# of the ONNX node describe the function body's tiling, not the kernel's).
PLUGIN_ATTRIBUTES = ("grid_h", "grid_w", "radius", "down_factor")


@dataclass(frozen=True)
class TileConfig:
    """Query/key tile shape and launch knobs of one compiled kernel variant."""

    tile_h: int
    tile_w: int
    block_p: int = 64  # pooled tokens per step (down_factor > 0)
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("tile_h", "tile_w", "block_p"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two (Triton block shape), got {value}")
        if self.tile_h * self.tile_w < 16 or self.block_p < 16:
            raise ValueError(
                f"tile_h * tile_w ({self.tile_h * self.tile_w}) and block_p ({self.block_p}) must be >= 16 "
                "(smallest tl.dot operand)"
            )


def default_config(head_dim: int, dtype: str) -> TileConfig:
    """GPU tiles: 8 x 16 queries for fp16 (tensor cores), 8 x 8 for exact fp32 (FMA, register bound)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if dtype == "fp32":
        # one stage: software pipelining of the pooled-token loads would need ~290 KB of shared memory
        return TileConfig(8, 8, block_p=32, num_warps=4, num_stages=1)
    return TileConfig(8, 16, block_p=64, num_warps=8 if head_dim > 64 else 4)


def head_dim_padded(head_dim: int) -> int:
    """Triton block dims are powers of two (>= 16 for tl.dot); padded channels load as zeros."""
    if head_dim < 1:
        raise ValueError(f"head_dim must be >= 1, got {head_dim}")
    return max(16, triton.next_power_of_2(head_dim))


def _tile_range(start: int, stop: int, radius: int, grid: int, tile: int) -> range:
    """Key tiles along one axis whose rows/cols can be within radius - 1 of [start, stop]."""
    return range(max(start - (radius - 1), 0) // tile, min(stop + radius - 1, grid - 1) // tile + 1)


def _gap(q0: int, q1: int, k0: int, k1: int) -> int:
    """Distance between the closed integer intervals [q0, q1] and [k0, k1] (0 if they overlap)."""
    return max(0, k0 - q1, q0 - k1)


def visited_tiles(grid_h: int, grid_w: int, radius: int, tile_h: int, tile_w: int) -> int:
    """Number of (query tile, key tile) pairs the kernel computes, per batch * head.

    Same rule as the kernel: a key tile is computed iff its closest pair to the query tile (both
    clipped to the grid) is at squared distance < radius^2; tiles outside the grid are never visited.
    """
    schema.validate_attributes(grid_h, grid_w, radius, 0)
    count = 0
    for ty in range(-(-grid_h // tile_h)):
        qy0, qy1 = ty * tile_h, min(ty * tile_h + tile_h, grid_h) - 1
        for tx in range(-(-grid_w // tile_w)):
            qx0, qx1 = tx * tile_w, min(tx * tile_w + tile_w, grid_w) - 1
            for kty in _tile_range(qy0, qy1, radius, grid_h, tile_h):
                dy = _gap(qy0, qy1, kty * tile_h, min(kty * tile_h + tile_h, grid_h) - 1)
                for ktx in _tile_range(qx0, qx1, radius, grid_w, tile_w):
                    dx = _gap(qx0, qx1, ktx * tile_w, min(ktx * tile_w + tile_w, grid_w) - 1)
                    count += dy * dy + dx * dx < radius * radius
    return count


def dense_tiles(grid_h: int, grid_w: int, tile_h: int, tile_w: int) -> int:
    """(query tile, key tile) pairs of dense attention with the same tiles, per batch * head."""
    tiles = -(-grid_h // tile_h) * -(-grid_w // tile_w)
    return tiles * tiles


def launch_grid(batch, heads, grid_h: int, grid_w: int, config: TileConfig) -> tuple:
    """(query tiles, batch * heads, 1). batch / heads may be ints or TensorRT symbolic shape expressions."""
    return (-(-grid_h // config.tile_h) * -(-grid_w // config.tile_w), batch * heads, 1)


@triton.jit
def _local_window_attention_kernel(
    q_ptr, k_ptr, v_ptr, scale_ptr, pool_weight_ptr,  # inputs: (B, H, N, D) x3, (H,), (d*d,)
    num_heads,  # int32 scalar
    out_ptr,  # output: (B, H, N, D)
    visits_ptr,  # None, or an int32 buffer with one slot per program (computed key tiles, for tests)
    GRID_H: tl.constexpr, GRID_W: tl.constexpr, RADIUS: tl.constexpr, DOWN: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_P: tl.constexpr,
):
    BLOCK: tl.constexpr = TILE_H * TILE_W
    TILES_W: tl.constexpr = (GRID_W + TILE_W - 1) // TILE_W
    N: tl.constexpr = GRID_H * GRID_W
    LOG2E: tl.constexpr = 1.4426950408889634

    pid_tile = tl.program_id(0)
    pid_bh = tl.program_id(1)
    base = pid_bh.to(tl.int64) * (N * HEAD_DIM)
    head = pid_bh % num_heads
    # fold log2(e) into the logit scale so the softmax runs on exp2
    scale = tl.load(scale_ptr + head).to(tl.float32) * LOG2E

    qy0 = (pid_tile // TILES_W) * TILE_H
    qx0 = (pid_tile % TILES_W) * TILE_W
    qy1 = tl.minimum(qy0 + TILE_H, GRID_H) - 1
    qx1 = tl.minimum(qx0 + TILE_W, GRID_W) - 1

    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    qy = qy0 + offs // TILE_W
    qx = qx0 + offs % TILE_W
    q_ok = (qy < GRID_H) & (qx < GRID_W)
    q_ptrs = base + (qy * GRID_W + qx)[:, None] * HEAD_DIM + offs_d[None, :]
    q = tl.load(q_ptr + q_ptrs, mask=q_ok[:, None] & d_ok[None, :], other=0.0)

    # online softmax state; m starts finite so rows with nothing visible yet stay NaN-free
    m_i = tl.full([BLOCK], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    acc = tl.zeros([BLOCK, D_PAD], dtype=tl.float32)
    visits = 0

    kty_lo = tl.maximum(qy0 - (RADIUS - 1), 0) // TILE_H
    kty_hi = tl.minimum(qy1 + RADIUS - 1, GRID_H - 1) // TILE_H
    ktx_lo = tl.maximum(qx0 - (RADIUS - 1), 0) // TILE_W
    ktx_hi = tl.minimum(qx1 + RADIUS - 1, GRID_W - 1) // TILE_W
    for kty in range(kty_lo, kty_hi + 1):
        ky0 = kty * TILE_H
        dy = tl.maximum(tl.maximum(ky0 - qy1, qy0 - (tl.minimum(ky0 + TILE_H, GRID_H) - 1)), 0)
        for ktx in range(ktx_lo, ktx_hi + 1):
            kx0 = ktx * TILE_W
            dx = tl.maximum(tl.maximum(kx0 - qx1, qx0 - (tl.minimum(kx0 + TILE_W, GRID_W) - 1)), 0)
            # skip key tiles whose closest pair is already outside the disc
            if dy * dy + dx * dx < RADIUS * RADIUS:
                ky = ky0 + offs // TILE_W
                kx = kx0 + offs % TILE_W
                k_ok = (ky < GRID_H) & (kx < GRID_W)
                kv_ptrs = base + (ky * GRID_W + kx)[:, None] * HEAD_DIM + offs_d[None, :]
                kv_mask = k_ok[:, None] & d_ok[None, :]
                k = tl.load(k_ptr + kv_ptrs, mask=kv_mask, other=0.0)
                v = tl.load(v_ptr + kv_ptrs, mask=kv_mask, other=0.0)
                ddy = qy[:, None] - ky[None, :]
                ddx = qx[:, None] - kx[None, :]
                visible = (ddy * ddy + ddx * ddx < RADIUS * RADIUS) & k_ok[None, :]
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
                s = tl.where(visible, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                p = tl.exp2(s - m_new[:, None])
                alpha = tl.exp2(m_i - m_new)
                l_i = l_i * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
                m_i = m_new
                visits += 1

    if DOWN > 0:
        POOLED_W: tl.constexpr = GRID_W // DOWN
        POOLED: tl.constexpr = (GRID_H // DOWN) * POOLED_W
        offs_p = tl.arange(0, BLOCK_P)
        for p0 in range(0, POOLED, BLOCK_P):
            idx = p0 + offs_p
            p_ok = idx < POOLED
            py = (idx // POOLED_W) * DOWN
            px = (idx % POOLED_W) * DOWN
            pmask = p_ok[:, None] & d_ok[None, :]
            kp = tl.zeros([BLOCK_P, D_PAD], dtype=tl.float32)
            vp = tl.zeros([BLOCK_P, D_PAD], dtype=tl.float32)
            # weighted sum over each d x d patch (weights row-major in the patch), in fp32
            for u in tl.static_range(DOWN):
                for w in tl.static_range(DOWN):
                    weight = tl.load(pool_weight_ptr + u * DOWN + w).to(tl.float32)
                    ptrs = base + ((py + u) * GRID_W + px + w)[:, None] * HEAD_DIM + offs_d[None, :]
                    kp += weight * tl.load(k_ptr + ptrs, mask=pmask, other=0.0).to(tl.float32)
                    vp += weight * tl.load(v_ptr + ptrs, mask=pmask, other=0.0).to(tl.float32)
            s = tl.dot(q, tl.trans(kp.to(q.dtype)), input_precision="ieee") * scale
            s = tl.where(p_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), vp.to(q.dtype), input_precision="ieee")
            m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + q_ptrs, out.to(out_ptr.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])
    if visits_ptr is not None:
        tl.store(visits_ptr + pid_bh * tl.num_programs(0) + pid_tile, visits)


def _constexprs(grid_h: int, grid_w: int, radius: int, down_factor: int, head_dim: int,
                config: TileConfig) -> dict[str, int]:
    return {
        "GRID_H": grid_h, "GRID_W": grid_w, "RADIUS": radius, "DOWN": down_factor,
        "HEAD_DIM": head_dim, "D_PAD": head_dim_padded(head_dim),
        "TILE_H": config.tile_h, "TILE_W": config.tile_w, "BLOCK_P": config.block_p,
    }


@lru_cache(maxsize=64)
def compile_kernel(dtype: str, param_dtype: str, head_dim: int, grid_h: int, grid_w: int, radius: int,
                   down_factor: int, config: TileConfig, target=None):
    """triton.compile the kernel for one attribute set (AOT: PTX + cubin, no GPU needed with a target).

    dtype: q/k/v/out element type, param_dtype: scale/pool_weight element type ("fp32" | "fp16");
    target: triton GPUTarget, None = the current device.
    Kernel parameters, in order: q, k, v, scale, pool_weight (pointers), num_heads (i32), out (pointer);
    the TensorRT AOT plugin passes inputs, extra int32 scalars, then outputs in exactly this order.
    """
    for name, value in (("dtype", dtype), ("param_dtype", param_dtype)):
        if value not in DTYPES:
            raise ValueError(f"{name} must be one of {list(DTYPES)}, got {value!r}")
    schema.validate_attributes(grid_h, grid_w, radius, down_factor)
    constexprs = _constexprs(grid_h, grid_w, radius, down_factor, head_dim, config)
    signature = {
        "q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}",
        "scale_ptr": f"*{param_dtype}", "pool_weight_ptr": f"*{param_dtype}",
        "num_heads": "i32", "out_ptr": f"*{dtype}", "visits_ptr": "constexpr",
        **{name: "constexpr" for name in constexprs},
    }
    source = triton.compiler.ASTSource(
        fn=_local_window_attention_kernel, signature=signature, constexprs={"visits_ptr": None, **constexprs},
    )
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(source, target=target, options=options)


def kernel_arguments(q_ptr: int, k_ptr: int, v_ptr: int, scale_ptr: int, pool_weight_ptr: int, num_heads: int,
                     out_ptr: int, grid_h: int, grid_w: int, radius: int, down_factor: int, head_dim: int,
                     config: TileConfig) -> tuple:
    """Positional arguments of a compiled kernel's launcher (constexpr slots included, as Triton expects)."""
    constexprs = _constexprs(grid_h, grid_w, radius, down_factor, head_dim, config)
    return (q_ptr, k_ptr, v_ptr, scale_ptr, pool_weight_ptr, num_heads, out_ptr, None, *constexprs.values())


def local_window_attention(q, k, v, scale, pool_weight, grid_h: int, grid_w: int, radius: int, down_factor: int,
                           config: TileConfig | None = None, visits=None):
    """Run the kernel on torch tensors (GPU, or CPU under TRITON_INTERPRET=1); returns out like q.

    q, k, v: contiguous (B, H, N, D) fp32 or fp16; scale (H,); pool_weight (d*d,) or a (1,) dummy.
    visits: optional int32 tensor of launch_grid's programs; receives the key tiles each one computed.
    """
    schema.check_shapes(q.shape, k.shape, v.shape, scale.shape, pool_weight.shape, grid_h, grid_w, radius,
                        down_factor)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (B, heads, tokens, head_dim)")
    batch, heads, _, head_dim = q.shape
    dtype = "fp16" if str(q.dtype).endswith("float16") else "fp32"
    config = config or default_config(head_dim, dtype)
    grid = launch_grid(batch, heads, grid_h, grid_w, config)[:2]
    if visits is not None and visits.numel() != grid[0] * grid[1]:
        raise ValueError(f"visits must have {grid[0] * grid[1]} slots (one per program), got {visits.numel()}")
    out = q.new_empty(q.shape)
    _local_window_attention_kernel[grid](
        q, k, v, scale, pool_weight, heads, out, visits,
        **_constexprs(grid_h, grid_w, radius, down_factor, head_dim, config),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


@dataclass(frozen=True)
class KernelCost:
    """Work of one call as executed (padded tiles and head_dim), for the roofline in docs/roofline.md.

    mma_flops: QK^T and PV products (tensor cores for fp16, FMA for fp32); fp32_flops: other math that
    grows with the work (on-the-fly pooling); exps: softmax exponentials; hbm_bytes: q, k, v, out once
    each; l2_bytes: every tile load (neighbouring programs share key tiles through L2).
    """

    mma_flops: float
    fp32_flops: float
    exps: float
    hbm_bytes: float
    l2_bytes: float


def cost_per_call(batch: int, heads: int, grid_h: int, grid_w: int, head_dim: int, radius: int,
                  down_factor: int = 0, dtype: str = "fp16", config: TileConfig | None = None) -> KernelCost:
    """What the kernel executes: every visited (query tile, key tile) pair costs 2 x tile^2 x D_pad MACs.

    With down_factor d every program also reads all of k and v to pool them (d^2 multiply-adds per pooled
    element), so pooled tokens cost O(N^2 / tile) L2 traffic.
    """
    config = config or default_config(head_dim, dtype)
    block = config.tile_h * config.tile_w
    d_pad = head_dim_padded(head_dim)
    element = 2 if dtype == "fp16" else 4
    tiles, rows, _ = launch_grid(batch, heads, grid_h, grid_w, config)
    programs = tiles * rows
    tile_pairs = visited_tiles(grid_h, grid_w, radius, config.tile_h, config.tile_w) * rows
    pairs = tile_pairs * block * block
    loaded_rows = programs * block * 2 + tile_pairs * block * 2  # q + out, then k + v per visited tile
    pooling = 0.0
    if down_factor:
        pooled = -(-((grid_h // down_factor) * (grid_w // down_factor)) // config.block_p) * config.block_p
        pairs += programs * block * pooled
        loaded_rows += programs * pooled * down_factor**2 * 2
        pooling = 2.0 * programs * pooled * down_factor**2 * 2 * d_pad
    return KernelCost(
        mma_flops=4.0 * pairs * d_pad,
        fp32_flops=pooling,
        exps=float(pairs),
        hbm_bytes=4.0 * rows * grid_h * grid_w * head_dim * element,
        l2_bytes=float(loaded_rows * d_pad * element),
    )
