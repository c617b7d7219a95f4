"""U-DiT downsampled-token attention in torch: the `dit_ops::downsampled_attention` custom op, its eager
path and the RoPE2D helper.

The eager path is reshape/permute + one scaled_dot_product_attention over (batch, heads x 4 groups):
fast, differentiable, no Python loops. RoPE2D uses real arithmetic (cos/sin tables and a pair swap, no
complex tensors) so that it exports. Under torch.export the public function calls the custom op, which
the exporter turns into one `dit_ops::DownsampledAttention` node.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from dit_ops.downsampled_attention import schema

__all__ = [
    "downsampled_attention", "rope2d_tables", "apply_rope2d", "rope2d", "split_groups", "merge_groups",
]


def rope2d_tables(
    grid_h: int, grid_w: int, head_dim: int, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """(cos, sin), each (grid_h * grid_w, head_dim) float32, for tokens of a row-major grid.

    Channels (4i, 4i+1) rotate by col * f_i and (4i+2, 4i+3) by row * f_i, f_i = 10000^(-4i / head_dim)
    (U-DiT's precompute_freqs_cis_2d, with the column count taken from the grid so non-square grids work).
    """
    if head_dim % 4:
        raise ValueError(f"RoPE2D needs head_dim divisible by 4, got {head_dim}")
    freqs = 1.0 / (schema.ROPE_THETA ** (torch.arange(0, head_dim, 4, dtype=torch.float32, device=device) / head_dim))
    n = torch.arange(grid_h * grid_w, device=device)
    col, row = (n % grid_w).float(), (n // grid_w).float()
    # pair 2i <- col * f_i, pair 2i+1 <- row * f_i; both channels of a pair share the angle
    angles = torch.stack([torch.outer(col, freqs), torch.outer(row, freqs)], dim=-1).reshape(-1, head_dim // 2)
    angles = angles.repeat_interleave(2, dim=-1)
    return angles.cos(), angles.sin()


def apply_rope2d(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate consecutive channel pairs (2m, 2m+1) of x (..., tokens, D) as complex numbers, in float32."""
    xf = x.float()
    pairs = xf.unflatten(-1, (-1, 2))
    swapped = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)  # i * (a + ib) = -b + ia
    return (xf * cos + swapped * sin).to(x.dtype)


@lru_cache(maxsize=32)
def _cached_tables(grid_h: int, grid_w: int, head_dim: int, device: torch.device) -> tuple[Tensor, Tensor]:
    return rope2d_tables(grid_h, grid_w, head_dim, device)


def rope2d(x: Tensor, grid_h: int, grid_w: int) -> Tensor:
    """RoPE2D of x (..., grid_h * grid_w, D) on its own token grid (tables cached per grid and device).

    While tracing (torch.export / compile) the tables are built fresh: a cached fake tensor would leak
    into later eager calls.
    """
    tracing = torch.compiler.is_exporting() or torch.compiler.is_compiling()
    tables = rope2d_tables if tracing else _cached_tables
    cos, sin = tables(grid_h, grid_w, x.shape[-1], x.device)
    return apply_rope2d(x, cos, sin)


def split_groups(x: Tensor, grid_h: int, grid_w: int) -> Tensor:
    """(B, heads, N, D) -> (B, heads, 4, N/4, D); group 2i+j holds pixels (2a+i, 2b+j), row-major in (a, b)."""
    b, h, _, c = x.shape
    x = x.reshape(b, h, grid_h // 2, 2, grid_w // 2, 2, c).permute(0, 1, 3, 5, 2, 4, 6)
    return x.reshape(b, h, schema.GROUPS, (grid_h // 2) * (grid_w // 2), c)


def merge_groups(x: Tensor, grid_h: int, grid_w: int) -> Tensor:
    """Inverse of split_groups."""
    b, h, _, _, c = x.shape
    x = x.reshape(b, h, 2, 2, grid_h // 2, grid_w // 2, c).permute(0, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, h, grid_h * grid_w, c)


def _native(q: Tensor, k: Tensor, v: Tensor, logit_scale: Tensor, grid_h: int, grid_w: int,
            rope: bool, cosine: bool) -> Tensor:
    schema.check_shapes(q.shape, k.shape, v.shape, logit_scale.shape, grid_h, grid_w, rope)
    b, h, n, c = q.shape
    q, k, v = (split_groups(t, grid_h, grid_w) for t in (q, k, v))
    if rope:
        q, k = rope2d(q, grid_h // 2, grid_w // 2), rope2d(k, grid_h // 2, grid_w // 2)
    scale = None  # SDPA default: D ** -0.5
    if cosine:
        temperature = logit_scale.clamp(max=schema.MAX_LOGIT_SCALE).exp().to(q.dtype)
        q = F.normalize(q, dim=-1) * temperature.view(1, h, 1, 1, 1)
        k = F.normalize(k, dim=-1)
        scale = 1.0
    m = n // schema.GROUPS
    out = F.scaled_dot_product_attention(
        q.reshape(b, h * schema.GROUPS, m, c), k.reshape(b, h * schema.GROUPS, m, c),
        v.reshape(b, h * schema.GROUPS, m, c), scale=scale,
    )
    return merge_groups(out.view(b, h, schema.GROUPS, m, c), grid_h, grid_w)


@torch.library.custom_op(schema.TORCH_OP, mutates_args=())
def _downsampled_attention_op(q: Tensor, k: Tensor, v: Tensor, logit_scale: Tensor, grid_h: int, grid_w: int,
                              rope: bool, cosine: bool) -> Tensor:
    return _native(q, k, v, logit_scale, grid_h, grid_w, rope, cosine)


@_downsampled_attention_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, logit_scale: Tensor, grid_h: int, grid_w: int,
      rope: bool, cosine: bool) -> Tensor:
    schema.check_shapes(q.shape, k.shape, v.shape, logit_scale.shape, grid_h, grid_w, rope)
    return torch.empty_like(q)


def downsampled_attention(q: Tensor, k: Tensor, v: Tensor, logit_scale: Tensor, *, grid_h: int, grid_w: int,
                          rope: bool = True, cosine: bool = True) -> Tensor:
    """U-DiT attention of full-resolution q, k, v (B, heads, grid_h * grid_w, D); logit_scale (heads,) raw.

    Eager calls run the differentiable SDPA path; under torch.export this is one custom op call.
    """
    if torch.compiler.is_exporting():
        return torch.ops.dit_ops.downsampled_attention(q, k, v, logit_scale, grid_h, grid_w, rope, cosine)
    return _native(q, k, v, logit_scale, grid_h, grid_w, rope, cosine)
