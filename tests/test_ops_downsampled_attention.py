"""U-DiT downsampled-token attention and RoPE2D against straightforward (loop / complex-number) references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dit_ops.downsampled_attention.reference import (
    downsampled_attention,
    merge_groups,
    rope2d,
    rope2d_tables,
    split_groups,
)

GRIDS = [(8, 8), (6, 10), (2, 2), (12, 4)]


def _inputs(grid_h: int, grid_w: int, heads: int = 3, dim: int = 16, batch: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, grid_h * grid_w, dim, generator=gen) for _ in range(3))
    # ln 10 (the U-DiT init), one head above the ln 100 clamp, one low temperature
    logit_scale = torch.tensor([math.log(10.0), 5.0, -1.0][:heads])
    return q, k, v, logit_scale


def complex_rope2d(x: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """U-DiT's complex formulation: pair 2i rotates by col * f_i, pair 2i+1 by row * f_i."""
    dim = x.shape[-1]
    freqs = 1.0 / (10000.0 ** (torch.arange(0, dim, 4, dtype=torch.float64) / dim))
    n = torch.arange(grid_h * grid_w)
    col, row = (n % grid_w).double(), (n // grid_w).double()
    angles = torch.zeros(grid_h * grid_w, dim // 2, dtype=torch.float64)
    angles[:, 0::2] = torch.outer(col, freqs)
    angles[:, 1::2] = torch.outer(row, freqs)
    rotation = torch.polar(torch.ones_like(angles), angles)
    z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], dim // 2, 2).contiguous())
    return torch.view_as_real(z * rotation).flatten(-2).to(x.dtype)


def loop_reference(q, k, v, logit_scale, grid_h, grid_w, rope, cosine):
    """Explicit loop over the 4 interleaved groups, float64."""
    b, h, n, d = q.shape
    q, k, v, logit_scale = (t.double() for t in (q, k, v, logit_scale))
    out = torch.zeros_like(q).reshape(b, h, grid_h, grid_w, d)
    for i in range(2):
        for j in range(2):
            qs, ks, vs = (t.reshape(b, h, grid_h, grid_w, d)[:, :, i::2, j::2].reshape(b, h, -1, d) for t in (q, k, v))
            if rope:
                qs, ks = complex_rope2d(qs, grid_h // 2, grid_w // 2), complex_rope2d(ks, grid_h // 2, grid_w // 2)
            if cosine:
                temperature = logit_scale.clamp(max=math.log(100.0)).exp().view(1, h, 1, 1)
                logits = F.normalize(qs, dim=-1) @ F.normalize(ks, dim=-1).transpose(-1, -2) * temperature
            else:
                logits = qs @ ks.transpose(-1, -2) / math.sqrt(d)
            out[:, :, i::2, j::2] = (logits.softmax(-1) @ vs).reshape(b, h, grid_h // 2, grid_w // 2, d)
    return out.reshape(b, h, n, d)


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (1, 7)])
@pytest.mark.parametrize("dim", [8, 24])
def test_rope2d_matches_complex_reference(grid, dim):
    x = torch.randn(2, 3, grid[0] * grid[1], dim)
    torch.testing.assert_close(rope2d(x, *grid), complex_rope2d(x, *grid), atol=1e-6, rtol=1e-6)


def test_rope2d_tables_layout():
    cos, sin = rope2d_tables(2, 3, 8)
    assert cos.shape == sin.shape == (6, 8) and cos.dtype == torch.float32
    # token 4 = (row 1, col 1): channels 0-1 rotate by col * f_0 = 1, channels 2-3 by row * f_0 = 1,
    # channels 4-5 by col * f_1, 6-7 by row * f_1 with f_1 = 10000^(-1/2)
    expected = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.01, 0.01, 0.01, 0.01]).cos()
    torch.testing.assert_close(cos[4], expected)
    assert torch.all(sin[0] == 0)  # token 0 is not rotated


def test_rope2d_keeps_dtype_and_norm():
    x = torch.randn(1, 2, 16, 8, dtype=torch.float16)
    y = rope2d(x, 4, 4)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float().norm(dim=-1), x.float().norm(dim=-1), atol=2e-2, rtol=1e-3)


def test_split_merge_groups_layout():
    x = torch.arange(6 * 8).float().view(1, 1, 48, 1)
    groups = split_groups(x, 6, 8)
    assert groups.shape == (1, 1, 4, 12, 1)
    grid = x.view(6, 8)
    for i in range(2):
        for j in range(2):
            assert torch.equal(groups[0, 0, 2 * i + j, :, 0], grid[i::2, j::2].reshape(-1))
    assert torch.equal(merge_groups(groups, 6, 8), x)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("rope, cosine", [(True, True), (False, True), (True, False), (False, False)])
def test_eager_matches_loop_reference(grid, rope, cosine):
    q, k, v, logit_scale = _inputs(*grid)
    out = downsampled_attention(q, k, v, logit_scale, grid_h=grid[0], grid_w=grid[1], rope=rope, cosine=cosine)
    ref = loop_reference(q, k, v, logit_scale, grid[0], grid[1], rope, cosine)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


def test_groups_do_not_mix():
    """Changing a key of group 0 leaves the outputs of groups 1..3 untouched."""
    q, k, v, logit_scale = _inputs(6, 6)
    out = downsampled_attention(q, k, v, logit_scale, grid_h=6, grid_w=6)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 0] += 3.0  # pixel (0, 0) belongs to group 0
    v2[:, :, 0] -= 3.0
    out2 = downsampled_attention(q, k2, v2, logit_scale, grid_h=6, grid_w=6)
    group_of = torch.tensor([2 * (y % 2) + (x % 2) for y in range(6) for x in range(6)])
    assert torch.equal(out[:, :, group_of != 0], out2[:, :, group_of != 0])
    assert not torch.allclose(out[:, :, group_of == 0], out2[:, :, group_of == 0])


def test_gradients_match_reference():
    q, k, v, logit_scale = _inputs(6, 10)
    logit_scale = torch.tensor([0.5, 2.0, 3.0])  # below the clamp, so every head has a gradient
    leaves = [t.clone().requires_grad_() for t in (q, k, v, logit_scale)]
    weights = torch.linspace(-1, 1, q.numel()).view_as(q)
    (downsampled_attention(*leaves, grid_h=6, grid_w=10) * weights).sum().backward()
    tiled = [t.grad for t in leaves]
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    (loop_reference(*leaves64, 6, 10, True, True) * weights.double()).sum().backward()
    for got, want in zip(tiled, (t.grad for t in leaves64)):
        assert got.abs().sum() > 0
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)


def test_custom_op_opcheck():
    q, k, v, logit_scale = _inputs(4, 6)
    torch.library.opcheck(
        torch.ops.dit_ops.downsampled_attention.default, (q, k, v, logit_scale, 4, 6, True, True),
        test_utils=("test_autograd_registration", "test_faketensor"),
    )
    torch.testing.assert_close(
        torch.ops.dit_ops.downsampled_attention(q, k, v, logit_scale, 4, 6, True, True).double(),
        loop_reference(q, k, v, logit_scale, 4, 6, True, True), atol=1e-5, rtol=0,
    )


@pytest.mark.parametrize(
    "grid, dim, rope, message",
    [
        ((5, 6), 16, True, "must be even"),
        ((4, 4), 6, True, "divisible by 4"),
    ],
)
def test_bad_input_is_named(grid, dim, rope, message):
    q, k, v, logit_scale = _inputs(*grid, dim=dim)
    with pytest.raises(ValueError, match=message):
        downsampled_attention(q, k, v, logit_scale, grid_h=grid[0], grid_w=grid[1], rope=rope)


def test_head_dim_not_divisible_by_4_without_rope():
    q, k, v, logit_scale = _inputs(4, 4, dim=6)
    out = downsampled_attention(q, k, v, logit_scale, grid_h=4, grid_w=4, rope=False)
    torch.testing.assert_close(out.double(), loop_reference(q, k, v, logit_scale, 4, 4, False, True), atol=1e-5, rtol=0)


def test_token_count_must_match_grid():
    q, k, v, logit_scale = _inputs(4, 4)
    with pytest.raises(ValueError, match="grid_h \\* grid_w"):
        downsampled_attention(q, k, v, logit_scale, grid_h=4, grid_w=6)
