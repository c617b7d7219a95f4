"""CLEAR local-window attention: tile plan, eager tiled path and custom op against the dense definition."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dit_ops.local_window_attention import schema
from dit_ops.local_window_attention.reference import (
    dense_local_window_attention,
    local_window_attention,
    pool_tokens,
)

GRIDS = [(8, 8), (6, 11), (13, 21), (1, 40), (40, 1), (17, 33)]
RADII = [1, 2, 5, 8]


def _inputs(grid_h: int, grid_w: int, heads: int = 3, dim: int = 8, batch: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    n = grid_h * grid_w
    q, k, v = (torch.randn(batch, heads, n, dim, generator=gen) for _ in range(3))
    scale = dim**-0.5 * (0.5 + torch.rand(heads, generator=gen))  # realistic logit scales, one per head
    return q, k, v, scale


def _pool_weight(d: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.full((d * d,), 1.0 / d**2) + 0.05 * torch.randn(d * d, generator=gen)


def _disc(grid_h: int, grid_w: int, radius: int) -> np.ndarray:
    y, x = np.divmod(np.arange(grid_h * grid_w), grid_w)
    return (y[:, None] - y[None]) ** 2 + (x[:, None] - x[None]) ** 2 < radius**2


# ---------------------------------------------------------------- tile plan (numpy)


@pytest.mark.parametrize("grid", [(8, 8), (5, 7), (1, 23), (19, 4), (30, 18)])
@pytest.mark.parametrize("radius", [1, 3, 6, 40])
@pytest.mark.parametrize("tile", [16, 3, (2, 5)])
def test_tile_plan_reproduces_the_disc(grid, radius, tile):
    """Every query sees, through its tile's window and mask, exactly the keys of its clipped disc."""
    grid_h, grid_w = grid
    plan = schema.TilePlan.create(grid_h, grid_w, radius, tile)
    n = grid_h * grid_w
    q_index, k_index, mask = plan.query_index(), plan.key_index(), plan.mask()
    assert mask.shape == (plan.num_tiles, plan.tile_size, plan.window_size)
    assert q_index.min() >= 0 and q_index.max() < n and k_index.min() >= 0 and k_index.max() < n
    assert plan.window_h <= grid_h and plan.window_w <= grid_w
    seen = np.zeros((n, n), dtype=bool)
    rows = plan.output_index()
    tile, slot = np.divmod(rows, plan.tile_size)
    assert np.array_equal(q_index[tile, slot], np.arange(n))  # the output row of token t is query t
    seen[np.arange(n)[:, None], k_index[tile]] = mask[tile, slot]
    assert np.array_equal(seen, _disc(grid_h, grid_w, radius))
    # every tile row (also of overlapping tiles) sees its own query, so softmax rows are never empty
    assert mask.any(axis=-1).all()


def test_tile_plan_sizes_and_halo():
    plan = schema.TilePlan.create(64, 48, 8)
    assert (plan.tile_h, plan.tile_w, plan.halo_h, plan.window_h, plan.window_w) == (8, 8, 7, 22, 22)
    assert (plan.tiles_h, plan.tiles_w, plan.num_tiles) == (8, 6, 48)
    small = schema.TilePlan.create(4, 100, 50)  # tile clamps to the grid, halo and window to the grid
    assert (small.tile_h, small.halo_h, small.window_h, small.window_w) == (4, 3, 4, 100)


def test_schema_modules_do_not_import_torch():
    code = (
        "import sys, dit_ops, dit_ops.local_window_attention.schema, dit_ops.downsampled_attention.schema;"
        "assert 'torch' not in sys.modules, 'schema imported torch'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- eager path == dense definition


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("radius", RADII)
def test_eager_matches_dense(grid, radius):
    grid_h, grid_w = grid
    q, k, v, scale = _inputs(grid_h, grid_w)
    kw = dict(grid_h=grid_h, grid_w=grid_w, radius=radius)
    out = local_window_attention(q, k, v, scale, **kw)
    ref = dense_local_window_attention(q, k, v, scale, **kw)
    assert out.shape == q.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("grid", [(5, 7), (1, 30), (12, 20)])
def test_radius_beyond_grid_is_full_attention(grid):
    grid_h, grid_w = grid
    q, k, v, scale = _inputs(grid_h, grid_w)
    radius = grid_h + grid_w  # every key of the grid is inside the disc
    out = local_window_attention(q, k, v, scale, grid_h=grid_h, grid_w=grid_w, radius=radius)
    full = F.scaled_dot_product_attention(q * scale.view(1, -1, 1, 1), k, v, scale=1.0)
    torch.testing.assert_close(out, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "grid_h, grid_w, radius, d", [(8, 12, 3, 2), (16, 16, 8, 4), (12, 20, 2, 4), (20, 20, 5, 2), (6, 6, 30, 3)]
)
def test_eager_pooled_matches_dense(grid_h, grid_w, radius, d):
    q, k, v, scale = _inputs(grid_h, grid_w)
    kw = dict(grid_h=grid_h, grid_w=grid_w, radius=radius, down_factor=d, pool_weight=_pool_weight(d))
    torch.testing.assert_close(
        local_window_attention(q, k, v, scale, **kw), dense_local_window_attention(q, k, v, scale, **kw),
        atol=1e-5, rtol=0,
    )


def test_pool_tokens_is_mean_pooling_at_init():
    x = torch.randn(2, 3, 8 * 12, 4)
    pooled = pool_tokens(x, torch.full((4,), 0.25), 8, 12, 2)
    grid = x.reshape(2, 3, 8, 12, 4).permute(0, 1, 4, 2, 3).reshape(6, 4, 8, 12)
    ref = F.avg_pool2d(grid, 2).reshape(2, 3, 4, 4 * 6).transpose(-1, -2)
    torch.testing.assert_close(pooled, ref)


@pytest.mark.parametrize("d", [0, 2])
def test_gradients_match_dense(d):
    grid_h, grid_w, radius = 10, 14, 4
    q, k, v, scale = _inputs(grid_h, grid_w)
    weight = _pool_weight(d) if d else None
    leaves = [t.clone().requires_grad_() for t in (q, k, v, scale)] + ([weight.clone().requires_grad_()] if d else [])
    grads = []
    for fn in (local_window_attention, dense_local_window_attention):
        for t in leaves:
            t.grad = None
        out = fn(*leaves[:4], grid_h=grid_h, grid_w=grid_w, radius=radius, down_factor=d,
                 pool_weight=leaves[4] if d else None)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append([t.grad.clone() for t in leaves])
    for tiled, dense in zip(*grads):
        assert tiled.abs().sum() > 0
        torch.testing.assert_close(tiled, dense, atol=1e-5, rtol=1e-5)


def test_half_precision_close_to_float():
    q, k, v, scale = _inputs(9, 13)
    kw = dict(grid_h=9, grid_w=13, radius=4, down_factor=0)
    out = local_window_attention(q.half(), k.half(), v.half(), scale.half(), **kw)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), local_window_attention(q, k, v, scale, **kw), atol=5e-3, rtol=0)


def test_custom_op_opcheck():
    q, k, v, scale = _inputs(6, 10)
    for weight, d in ((None, 0), (_pool_weight(2), 2)):
        torch.library.opcheck(
            torch.ops.dit_ops.local_window_attention.default, (q, k, v, scale, weight, 6, 10, 3, d),
            test_utils=("test_autograd_registration", "test_faketensor"),
        )
    ref = dense_local_window_attention(q, k, v, scale, grid_h=6, grid_w=10, radius=3)
    torch.testing.assert_close(torch.ops.dit_ops.local_window_attention(q, k, v, scale, None, 6, 10, 3, 0), ref,
                               atol=1e-5, rtol=0)


# ---------------------------------------------------------------- cost is linear in tokens


class _LargestOutput(TorchDispatchMode):
    """Largest tensor (in elements) produced by any aten op while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_memory_is_linear_in_tokens():
    largest = {}
    for side in (64, 128):
        q, k, v, scale = _inputs(side, side, heads=1, dim=4, batch=1)
        kw = dict(grid_h=side, grid_w=side, radius=8)
        local_window_attention(q, k, v, scale, **kw)  # builds the cached tile plan outside the measurement
        with torch.no_grad(), _LargestOutput() as probe:
            local_window_attention(q, k, v, scale, **kw)
        largest[side] = probe.largest
        assert probe.largest < (side * side) ** 2 / 4  # nowhere near N x N
    assert largest[128] / largest[64] <= 4.5, largest


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(grid_h=5, grid_w=5, radius=2), "grid_h \\* grid_w"),
        (dict(grid_h=6, grid_w=8, radius=0), "radius must be >= 1"),
        (dict(grid_h=6, grid_w=8, radius=2, down_factor=5, pool_weight=torch.ones(25)), "must divide the token grid"),
        (dict(grid_h=6, grid_w=8, radius=2, down_factor=2), "needs pool_weight of shape \\(4,\\)"),
        (dict(grid_h=6, grid_w=8, radius=2, down_factor=-1), "down_factor must be 0"),
    ],
)
def test_bad_input_is_named(kwargs, message):
    q, k, v, scale = _inputs(6, 8)
    with pytest.raises(ValueError, match=message):
        local_window_attention(q, k, v, scale, **kwargs)


def test_bad_scale_shape():
    q, k, v, _ = _inputs(6, 8)
    with pytest.raises(ValueError, match="scale must have shape \\(heads,\\)"):
        local_window_attention(q, k, v, torch.ones(2), grid_h=6, grid_w=8, radius=2)
