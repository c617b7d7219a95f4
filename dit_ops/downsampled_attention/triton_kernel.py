"""Triton kernel for dit_ops::DownsampledAttention (U-DiT), used by the TensorRT plugin.

Fused flash-style attention over the 4 interleaved half-resolution groups. One program per
(query block, (batch * head) * 4 + group). A group's q, k, v are read in place from the full-resolution
row-major layout by strided addressing (group 2i+j holds pixels (2a+i, 2b+j)), so there is no
pixel-unshuffle copy; the output is written back to the same pixels. RoPE2D (on the half-resolution
grid) and the cosine normalisation are applied in fp32 inside the kernel right after each load; the
softmax is an fp32 online softmax.

Cosine logits are scaled by up to exp(ln 100) = 100, so rounding the normalised q, k to fp16 (2^-11)
would move a logit by up to ~0.1. For fp16 inputs in cosine mode the kernel splits q and k into
fp16 hi + lo parts and sums three tensor-core products (hi.hi + hi.lo + lo.hi), which keeps the logits
at about fp32 accuracy for twice the QK^T work.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import triton
import triton.language as tl

from dit_ops.downsampled_attention import schema

__all__ = [
    "PLUGIN_ID", "PLUGIN_ATTRIBUTES", "BlockConfig", "default_config", "launch_grid", "head_dim_padded",
    "compile_kernel", "kernel_arguments", "downsampled_attention", "KernelCost", "cost_per_call",
]

DTYPES = ("fp16", "fp32")  # element types the kernel is built for
PLUGIN_ID = f"{schema.DOMAIN}::{schema.OP_TYPE}"
# Node attributes the TensorRT plugin declares (ONNX has no bool: rope / cosine are 0 / 1 ints).
PLUGIN_ATTRIBUTES = ("grid_h", "grid_w", "rope", "cosine")


@dataclass(frozen=True)
class BlockConfig:
    """Query/key block sizes and launch knobs of one compiled kernel variant."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16 (tl.dot operand), got {value}")


def default_config(head_dim: int, dtype: str) -> BlockConfig:
    """GPU blocks: 128 x 64 for fp16 (tensor cores), 32 x 32 for exact fp32 (FMA, register bound).

    Tall query blocks matter here: RoPE and the normalisation of a group's keys are recomputed once per
    query block, so 128 query rows halve that work against 64.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if dtype == "fp32":
        return BlockConfig(32, 32, num_warps=4)
    return BlockConfig(128, 64, num_warps=8)


def head_dim_padded(head_dim: int) -> int:
    """Triton block dims are powers of two (>= 16 for tl.dot); padded channels load as zeros."""
    if head_dim < 1:
        raise ValueError(f"head_dim must be >= 1, got {head_dim}")
    return max(16, triton.next_power_of_2(head_dim))


def launch_grid(batch, heads, grid_h: int, grid_w: int, config: BlockConfig) -> tuple:
    """(query blocks per group, batch * heads * 4, 1). batch / heads may be TensorRT shape expressions."""
    tokens = (grid_h // 2) * (grid_w // 2)
    return (-(-tokens // config.block_m), batch * heads * schema.GROUPS, 1)


@triton.jit
def _load_group(ptr, base, a, b, row_ok, offs_d, d_ok, gi, gj, GRID_W: tl.constexpr, HEAD_DIM: tl.constexpr,
                ROPE: tl.constexpr):
    """Rows (a, b) of group (gi, gj) as fp32 (BLOCK, D_PAD), with RoPE2D at (row a, col b) if asked."""
    rows = ((2 * a + gi) * GRID_W + 2 * b + gj)[:, None] * HEAD_DIM
    mask = row_ok[:, None] & d_ok[None, :]
    x = tl.load(ptr + base + rows + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    if ROPE:
        # channel pair (2m, 2m+1) is a complex number; pair m = 2i turns by col * f_i, m = 2i + 1 by row * f_i
        partner = tl.load(ptr + base + rows + (offs_d ^ 1)[None, :], mask=mask, other=0.0).to(tl.float32)
        LOG2_THETA: tl.constexpr = 13.287712379549449  # log2(10000)
        freq = tl.exp2(-((offs_d // 4) * 4).to(tl.float32) / HEAD_DIM * LOG2_THETA)
        use_row = ((offs_d // 2) % 2) == 1
        pos = tl.where(use_row[None, :], a[:, None], b[:, None]).to(tl.float32)
        angle = pos * freq[None, :]
        sign = tl.where(offs_d % 2 == 0, -1.0, 1.0)
        x = x * tl.cos(angle) + sign[None, :] * partner * tl.sin(angle)
    return x


@triton.jit
def _downsampled_attention_kernel(
    q_ptr, k_ptr, v_ptr, logit_scale_ptr,  # inputs: (B, H, N, D) x3, (H,)
    num_heads,  # int32 scalar
    out_ptr,  # output: (B, H, N, D)
    GRID_H: tl.constexpr, GRID_W: tl.constexpr, ROPE: tl.constexpr, COSINE: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT_QK: tl.constexpr,
):
    GROUP_W: tl.constexpr = GRID_W // 2
    TOKENS: tl.constexpr = (GRID_H // 2) * GROUP_W
    LOG2E: tl.constexpr = 1.4426950408889634
    LN_100: tl.constexpr = 4.605170185988092

    pid_m = tl.program_id(0)
    pid_z = tl.program_id(1)  # ((batch * heads) + head) * 4 + group
    bh = pid_z // 4
    gi = (pid_z % 4) // 2
    gj = pid_z % 2
    base = bh.to(tl.int64) * (GRID_H * GRID_W * HEAD_DIM)

    if COSINE:
        scale = tl.exp(tl.minimum(tl.load(logit_scale_ptr + bh % num_heads).to(tl.float32), LN_100)) * LOG2E
    else:
        scale = LOG2E / tl.sqrt(HEAD_DIM * 1.0)

    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < TOKENS
    qa = offs_m // GROUP_W
    qb = offs_m % GROUP_W
    q = _load_group(q_ptr, base, qa, qb, m_ok, offs_d, d_ok, gi, gj, GRID_W, HEAD_DIM, ROPE)
    if COSINE:  # F.normalize: x / max(||x||, 1e-12)
        q = q / tl.maximum(tl.sqrt(tl.sum(q * q, axis=1)), 1e-12)[:, None]
    q = q * scale
    q_hi = q.to(q_ptr.dtype.element_ty)
    if SPLIT_QK:
        q_lo = (q - q_hi.to(tl.float32)).to(q_ptr.dtype.element_ty)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(0, TOKENS, BLOCK_N):
        idx = n0 + offs_n
        n_ok = idx < TOKENS
        ka = idx // GROUP_W
        kb = idx % GROUP_W
        k = _load_group(k_ptr, base, ka, kb, n_ok, offs_d, d_ok, gi, gj, GRID_W, HEAD_DIM, ROPE)
        if COSINE:
            k = k / tl.maximum(tl.sqrt(tl.sum(k * k, axis=1)), 1e-12)[:, None]
        k_hi = k.to(k_ptr.dtype.element_ty)
        s = tl.dot(q_hi, tl.trans(k_hi), input_precision="ieee")
        if SPLIT_QK:
            k_lo = (k - k_hi.to(tl.float32)).to(k_ptr.dtype.element_ty)
            s += tl.dot(q_hi, tl.trans(k_lo)) + tl.dot(q_lo, tl.trans(k_hi))
        s = tl.where(n_ok[None, :], s, float("-inf"))
        v_rows = ((2 * ka + gi) * GRID_W + 2 * kb + gj)[:, None] * HEAD_DIM
        v = tl.load(v_ptr + base + v_rows + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    out = acc / l_i[:, None]
    out_rows = ((2 * qa + gi) * GRID_W + 2 * qb + gj)[:, None] * HEAD_DIM
    tl.store(out_ptr + base + out_rows + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])


def _constexprs(grid_h: int, grid_w: int, rope: bool, cosine: bool, head_dim: int, dtype: str,
                config: BlockConfig) -> dict[str, int]:
    return {
        "GRID_H": grid_h, "GRID_W": grid_w, "ROPE": int(bool(rope)), "COSINE": int(bool(cosine)),
        "HEAD_DIM": head_dim, "D_PAD": head_dim_padded(head_dim),
        "BLOCK_M": config.block_m, "BLOCK_N": config.block_n,
        "SPLIT_QK": int(bool(cosine) and dtype == "fp16"),
    }


@lru_cache(maxsize=64)
def compile_kernel(dtype: str, param_dtype: str, head_dim: int, grid_h: int, grid_w: int, rope: bool,
                   cosine: bool, config: BlockConfig, target=None):
    """triton.compile the kernel for one attribute set (AOT: PTX + cubin, no GPU needed with a target).

    dtype: q/k/v/out element type, param_dtype: logit_scale element type ("fp32" | "fp16");
    target: triton GPUTarget, None = the current device.
    Kernel parameters, in order: q, k, v, logit_scale (pointers), num_heads (i32), out (pointer); the
    TensorRT AOT plugin passes inputs, extra int32 scalars, then outputs in exactly this order.
    """
    for name, value in (("dtype", dtype), ("param_dtype", param_dtype)):
        if value not in DTYPES:
            raise ValueError(f"{name} must be one of {list(DTYPES)}, got {value!r}")
    schema.validate_attributes(grid_h, grid_w, head_dim, rope)
    constexprs = _constexprs(grid_h, grid_w, rope, cosine, head_dim, dtype, config)
    signature = {
        "q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "logit_scale_ptr": f"*{param_dtype}",
        "num_heads": "i32", "out_ptr": f"*{dtype}", **{name: "constexpr" for name in constexprs},
    }
    source = triton.compiler.ASTSource(fn=_downsampled_attention_kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=target, options={"num_warps": config.num_warps,
                                                          "num_stages": config.num_stages})


def kernel_arguments(q_ptr: int, k_ptr: int, v_ptr: int, logit_scale_ptr: int, num_heads: int, out_ptr: int,
                     grid_h: int, grid_w: int, rope: bool, cosine: bool, head_dim: int, dtype: str,
                     config: BlockConfig) -> tuple:
    """Positional arguments of a compiled kernel's launcher (constexpr slots included, as Triton expects)."""
    constexprs = _constexprs(grid_h, grid_w, rope, cosine, head_dim, dtype, config)
    return (q_ptr, k_ptr, v_ptr, logit_scale_ptr, num_heads, out_ptr, *constexprs.values())


def downsampled_attention(q, k, v, logit_scale, grid_h: int, grid_w: int, rope: bool, cosine: bool,
                          config: BlockConfig | None = None):
    """Run the kernel on torch tensors (GPU, or CPU under TRITON_INTERPRET=1); returns out like q.

    q, k, v: contiguous (B, H, N, D) fp32 or fp16; logit_scale (H,) raw (clamped to ln 100 in the kernel).
    """
    schema.check_shapes(q.shape, k.shape, v.shape, logit_scale.shape, grid_h, grid_w, rope)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (B, heads, tokens, head_dim)")
    batch, heads, _, head_dim = q.shape
    dtype = "fp16" if str(q.dtype).endswith("float16") else "fp32"
    config = config or default_config(head_dim, dtype)
    out = q.new_empty(q.shape)
    _downsampled_attention_kernel[launch_grid(batch, heads, grid_h, grid_w, config)[:2]](
        q, k, v, logit_scale, heads, out,
        **_constexprs(grid_h, grid_w, rope, cosine, head_dim, dtype, config),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


@dataclass(frozen=True)
class KernelCost:
    """Work of one call as executed (padded blocks and head_dim), for the roofline in docs/roofline.md.

    mma_flops: QK^T (three products when split) and PV (tensor cores for fp16, FMA for fp32);
    fp32_flops: RoPE and normalisation of every loaded q / k row; exps: softmax exponentials;
    hbm_bytes: q, k, v, out once each; l2_bytes: every block load (a group's keys once per query block).
    """

    mma_flops: float
    fp32_flops: float
    exps: float
    hbm_bytes: float
    l2_bytes: float


# fp32 operations per loaded element: RoPE = sin + cos (libdevice, ~20 each, an estimate) + 4 for the
# rotation; the cosine normalisation = 3 (square-add, divide, and the share of the row sum).
ROPE_FLOPS = 44
NORM_FLOPS = 3


def cost_per_call(batch: int, heads: int, grid_h: int, grid_w: int, head_dim: int, rope: bool = True,
                  cosine: bool = True, dtype: str = "fp16", config: BlockConfig | None = None) -> KernelCost:
    """What the kernel executes: 4 groups x (padded M)^2 pairs x D_pad MACs for QK^T (x3 when split) and PV.

    RoPE and the normalisation are recomputed for a group's keys once per query block.
    """
    config = config or default_config(head_dim, dtype)
    tokens = (grid_h // 2) * (grid_w // 2)
    q_blocks = -(-tokens // config.block_m)
    cols = -(-tokens // config.block_n) * config.block_n
    groups = batch * heads * schema.GROUPS
    q_rows = groups * q_blocks * config.block_m
    k_rows = groups * q_blocks * cols
    d_pad = head_dim_padded(head_dim)
    element = 2 if dtype == "fp16" else 4
    rope_loads = 2 if rope else 1  # RoPE reads each q / k row twice (the pair partner)
    per_element = ROPE_FLOPS * rope + NORM_FLOPS * cosine
    return KernelCost(
        mma_flops=2.0 * q_rows * cols * d_pad * ((3 if (cosine and dtype == "fp16") else 1) + 1),
        fp32_flops=float(per_element * (q_rows + k_rows) * d_pad),
        exps=float(q_rows * cols),
        hbm_bytes=4.0 * batch * heads * grid_h * grid_w * head_dim * element,
        l2_bytes=float(((q_rows + k_rows) * rope_loads + k_rows + q_rows) * d_pad * element),
    )
