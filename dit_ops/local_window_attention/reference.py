"""CLEAR local-window attention in torch: the `dit_ops::local_window_attention` custom op and its eager path.

The eager path gathers query tiles and their haloed key windows (static indices and per-tile disc mask
from `schema.TilePlan`, built once per grid/radius/device) and runs one batched masked attention over
all tiles, so memory and time are linear in the number of tokens and autograd comes for free. Under
torch.export the public function calls the custom op instead, which the exporter turns into one
`dit_ops::LocalWindowAttention` node.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from dit_ops.local_window_attention import schema

__all__ = ["local_window_attention", "dense_local_window_attention", "pool_tokens"]


def pool_tokens(x: Tensor, pool_weight: Tensor, grid_h: int, grid_w: int, down_factor: int) -> Tensor:
    """(B, heads, N, D) -> (B, heads, N / d^2, D): weighted sum over each d x d patch (weights row-major)."""
    b, h, _, c = x.shape
    d = down_factor
    patches = x.reshape(b, h, grid_h // d, d, grid_w // d, d, c)
    pooled = torch.einsum("bhyixjc,ij->bhyxc", patches, pool_weight.to(x.dtype).reshape(d, d))
    return pooled.reshape(b, h, (grid_h // d) * (grid_w // d), c)


@lru_cache(maxsize=64)
def _tile_tensors(grid_h: int, grid_w: int, radius: int, device: torch.device) -> tuple[Tensor, ...]:
    """Query / key / output gather indices and the additive (0 / -inf) per-tile mask, cached per grid."""
    plan = schema.TilePlan.create(grid_h, grid_w, radius)
    inside = torch.from_numpy(plan.mask())
    additive = torch.zeros(inside.shape).masked_fill_(~inside, float("-inf"))
    return (
        torch.from_numpy(plan.query_index().reshape(-1)).to(device),
        torch.from_numpy(plan.key_index().reshape(-1)).to(device),
        torch.from_numpy(plan.output_index()).to(device),
        additive.to(device),
    )


def _check(q: Tensor, k: Tensor, v: Tensor, scale: Tensor, pool_weight: Tensor | None,
           grid_h: int, grid_w: int, radius: int, down_factor: int) -> None:
    schema.check_shapes(
        q.shape, k.shape, v.shape, scale.shape, None if pool_weight is None else pool_weight.shape,
        grid_h, grid_w, radius, down_factor,
    )


def _tiled(q: Tensor, k: Tensor, v: Tensor, scale: Tensor, pool_weight: Tensor | None,
           grid_h: int, grid_w: int, radius: int, down_factor: int) -> Tensor:
    """Eager tiled path: batched matmuls over (batch * heads, tiles) with the static per-tile mask.

    Plain matmul + softmax beats scaled_dot_product_attention here: with a float mask SDPA takes its
    math path plus a guard against fully masked rows, which cannot occur (a query always sees itself).
    """
    _check(q, k, v, scale, pool_weight, grid_h, grid_w, radius, down_factor)
    b, h, n, c = q.shape
    q_index, k_index, out_index, mask = _tile_tensors(grid_h, grid_w, radius, q.device)
    tiles, tq, tk = mask.shape
    q = q * scale.to(q.dtype).view(1, h, 1, 1)
    q_tiles = q.index_select(2, q_index).view(b * h, tiles, tq, c)
    k_tiles = k.index_select(2, k_index).view(b * h, tiles, tk, c)
    v_tiles = v.index_select(2, k_index).view(b * h, tiles, tk, c)
    logits = q_tiles @ k_tiles.transpose(-1, -2) + mask.to(q.dtype)
    if down_factor == 0:
        probs = logits.softmax(dim=-1, dtype=torch.float32).to(v.dtype)
        out = probs @ v_tiles
    else:
        # every query also sees all pooled tokens: one softmax over [window | pooled]
        pooled_k = pool_tokens(k, pool_weight, grid_h, grid_w, down_factor).reshape(b * h, 1, -1, c)
        pooled_v = pool_tokens(v, pool_weight, grid_h, grid_w, down_factor).reshape(b * h, 1, -1, c)
        logits = torch.cat([logits, q_tiles @ pooled_k.transpose(-1, -2)], dim=-1)
        probs = logits.softmax(dim=-1, dtype=torch.float32).to(v.dtype)
        out = probs[..., :tk] @ v_tiles + probs[..., tk:] @ pooled_v
    return out.reshape(b, h, tiles * tq, c).index_select(2, out_index)


@torch.library.custom_op(schema.TORCH_OP, mutates_args=())
def _local_window_attention_op(
    q: Tensor, k: Tensor, v: Tensor, scale: Tensor, pool_weight: Tensor | None,
    grid_h: int, grid_w: int, radius: int, down_factor: int,
) -> Tensor:
    return _tiled(q, k, v, scale, pool_weight, grid_h, grid_w, radius, down_factor)


@_local_window_attention_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, scale: Tensor, pool_weight: Tensor | None,
      grid_h: int, grid_w: int, radius: int, down_factor: int) -> Tensor:
    _check(q, k, v, scale, pool_weight, grid_h, grid_w, radius, down_factor)
    return torch.empty_like(q)


def local_window_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: Tensor, *, grid_h: int, grid_w: int, radius: int,
    down_factor: int = 0, pool_weight: Tensor | None = None,
) -> Tensor:
    """CLEAR attention of q, k, v (B, heads, N = grid_h * grid_w, D); logits q.k * scale[head].

    Eager calls run the differentiable tiled path; under torch.export this is one custom op call.
    """
    if torch.compiler.is_exporting():
        return torch.ops.dit_ops.local_window_attention(q, k, v, scale, pool_weight, grid_h, grid_w, radius, down_factor)
    return _tiled(q, k, v, scale, pool_weight, grid_h, grid_w, radius, down_factor)


def dense_local_window_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: Tensor, *, grid_h: int, grid_w: int, radius: int,
    down_factor: int = 0, pool_weight: Tensor | None = None,
) -> Tensor:
    """Dense N x N masked reference (tests only): the definition, written out."""
    _check(q, k, v, scale, pool_weight, grid_h, grid_w, radius, down_factor)
    y = torch.arange(grid_h, device=q.device).repeat_interleave(grid_w)
    x = torch.arange(grid_w, device=q.device).repeat(grid_h)
    allowed = (y[:, None] - y[None, :]) ** 2 + (x[:, None] - x[None, :]) ** 2 < radius**2
    s = scale.to(q.dtype).view(1, -1, 1, 1)
    logits = (q @ k.transpose(-1, -2) * s).masked_fill(~allowed, float("-inf"))
    values = v
    if down_factor > 0:
        pooled_k = pool_tokens(k, pool_weight, grid_h, grid_w, down_factor)
        logits = torch.cat([logits, q @ pooled_k.transpose(-1, -2) * s], dim=-1)
        values = torch.cat([v, pool_tokens(v, pool_weight, grid_h, grid_w, down_factor)], dim=2)
    return logits.softmax(dim=-1) @ values
