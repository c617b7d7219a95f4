"""dit_ops::DownsampledAttention: names, attributes and shape rule (numpy only, no torch).

Semantics (U-DiT downsampled-token attention on full-resolution q, k, v of a grid_h x grid_w token grid):
the tokens split into 4 interleaved half-resolution groups (group 2i+j holds pixels (2a+i, 2b+j)); per
(batch, group, head), RoPE2D on the half-resolution grid (if rope), logits cosine(q, k) *
exp(min(logit_scale[head], ln 100)) (if cosine) or q.k / sqrt(D), softmax over the group's keys; the
groups never mix and are merged back to the full grid.
"""

from __future__ import annotations

import math

from dit_ops import DOMAIN, OPSET_VERSION, PLUGIN_NAMESPACE, PLUGIN_VERSION

OP_TYPE = "DownsampledAttention"
TORCH_OP = f"{DOMAIN}::downsampled_attention"
GROUPS = 4  # 2 x 2 interleaved sub-grids
ROPE_THETA = 10000.0
MAX_LOGIT_SCALE = math.log(100.0)  # the learnable log-temperature is clamped to ln 100

INPUTS = ("q", "k", "v", "logit_scale")
OUTPUTS = ("out",)
ATTRIBUTES = ("num_heads", "head_dim", "grid_h", "grid_w", "rope", "cosine")
__all__ = [
    "DOMAIN", "OPSET_VERSION", "PLUGIN_NAMESPACE", "PLUGIN_VERSION", "OP_TYPE", "TORCH_OP", "GROUPS",
    "ROPE_THETA", "MAX_LOGIT_SCALE", "INPUTS", "OUTPUTS", "ATTRIBUTES", "validate_attributes", "check_shapes",
    "node_attributes",
]


def validate_attributes(grid_h: int, grid_w: int, head_dim: int, rope: bool) -> None:
    """Raise ValueError naming the bad attribute and the constraint."""
    if grid_h < 2 or grid_w < 2 or grid_h % 2 or grid_w % 2:
        raise ValueError(
            f"grid_h and grid_w must be even and >= 2 (4 interleaved half-resolution groups), got {grid_h} x {grid_w}"
        )
    if rope and head_dim % 4:
        raise ValueError(f"RoPE2D needs head_dim divisible by 4 (2 axes x complex pairs), got {head_dim}")


def check_shapes(
    q: tuple[int, ...], k: tuple[int, ...], v: tuple[int, ...], logit_scale: tuple[int, ...],
    grid_h: int, grid_w: int, rope: bool,
) -> tuple[int, ...]:
    """Validate input shapes (q, k, v: (B, heads, N, D); logit_scale: (heads,)); return the output shape."""
    q, k, v = tuple(q), tuple(k), tuple(v)
    if len(q) != 4:
        raise ValueError(f"q must be (batch, heads, tokens, head_dim), got shape {q}")
    if k != q or v != q:
        raise ValueError(f"q, k, v must have the same shape, got {q}, {k}, {v}")
    validate_attributes(grid_h, grid_w, q[3], rope)
    if q[2] != grid_h * grid_w:
        raise ValueError(f"tokens ({q[2]}) must equal grid_h * grid_w = {grid_h} * {grid_w} = {grid_h * grid_w}")
    if tuple(logit_scale) != (q[1],):
        raise ValueError(f"logit_scale must have shape (heads,) = ({q[1]},), got {tuple(logit_scale)}")
    return q


def node_attributes(num_heads: int, head_dim: int, grid_h: int, grid_w: int, rope: bool, cosine: bool) -> dict:
    """Every attribute of one DownsampledAttention ONNX node (booleans as 0 / 1 ints)."""
    validate_attributes(grid_h, grid_w, head_dim, rope)
    return {
        "num_heads": int(num_heads), "head_dim": int(head_dim), "grid_h": int(grid_h), "grid_w": int(grid_w),
        "rope": int(bool(rope)), "cosine": int(bool(cosine)),
        "plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION,
    }
