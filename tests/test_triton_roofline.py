"""Roofline of the two Triton kernels against H100 ceilings, and the table in docs/roofline.md.

`python -m tests.test_triton_roofline` prints the table; the test below fails when the doc drifts from it.
"""

from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("triton")

from dit_ops.downsampled_attention import triton_kernel as ds  # noqa: E402
from dit_ops.local_window_attention import triton_kernel as lw  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "roofline.md"


@dataclass(frozen=True)
class Ceilings:
    """H100 SXM5 (dense, no sparsity): NVIDIA datasheet; SFU rate as quoted by the FlashAttention-3 paper."""

    fp16_mma: float = 989e12  # FLOP/s, tensor cores
    fp32: float = 67e12  # FLOP/s, CUDA cores (also the fp32 kernels' exact FMA dot products)
    sfu: float = 3.9e12  # exponentials/s
    hbm: float = 3.35e12  # bytes/s


H100 = Ceilings()
HEADS, HEAD_DIM = 16, 64  # DiT-L/2 attention
RESOLUTIONS = {"2K": 128, "4K": 256, "8K": 512}  # image px / 16 (VAE /8, patch 2) tokens per side


def bound(cost, dtype: str = "fp16") -> tuple[float, str]:
    """(seconds, limiting resource) of the slowest ceiling."""
    mma_rate = H100.fp16_mma if dtype == "fp16" else H100.fp32
    times = {
        "MMA": cost.mma_flops / mma_rate, "FP32": cost.fp32_flops / H100.fp32,
        "SFU": cost.exps / H100.sfu, "HBM": cost.hbm_bytes / H100.hbm,
    }
    limiter = max(times, key=times.get)
    return times[limiter], limiter


def dense_seconds(side: int, dtype: str = "fp16") -> float:
    """Flash-style dense attention over all side^2 tokens (no padding): the baseline both kernels replace."""
    n = side * side
    element = 2 if dtype == "fp16" else 4
    cost = lw.KernelCost(mma_flops=4.0 * HEADS * n * n * HEAD_DIM, fp32_flops=0.0, exps=float(HEADS * n * n),
                         hbm_bytes=4.0 * HEADS * n * HEAD_DIM * element, l2_bytes=0.0)
    return bound(cost, dtype)[0]


def rows() -> list[dict]:
    kernels = [
        ("LocalWindowAttention", "r=8", lambda s: lw.cost_per_call(1, HEADS, s, s, HEAD_DIM, 8)),
        ("LocalWindowAttention", "r=16", lambda s: lw.cost_per_call(1, HEADS, s, s, HEAD_DIM, 16)),
        ("LocalWindowAttention", "r=8, d=4", lambda s: lw.cost_per_call(1, HEADS, s, s, HEAD_DIM, 8, 4)),
        ("DownsampledAttention", "RoPE, cosine", lambda s: ds.cost_per_call(1, HEADS, s, s, HEAD_DIM)),
        ("DownsampledAttention", "no RoPE, q.k/sqrt(D)",
         lambda s: ds.cost_per_call(1, HEADS, s, s, HEAD_DIM, rope=False, cosine=False)),
    ]
    out = []
    for name, variant, cost_of in kernels:
        for res, side in RESOLUTIONS.items():
            cost = cost_of(side)
            seconds, limiter = bound(cost)
            dense = dense_seconds(side)
            out.append({
                "kernel": name, "variant": variant, "res": res, "grid": f"{side}x{side}", "cost": cost,
                "ms": seconds * 1e3, "limiter": limiter, "dense_ms": dense * 1e3, "speedup": dense / seconds,
            })
    return out


def markdown_table() -> str:
    lines = [
        "| kernel | variant | image | tokens | MMA GFLOP | FP32 GFLOP | exp G | HBM MB | L2 GB | bound ms "
        "| limited by | dense ms | speed-up |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows():
        c = r["cost"]
        lines.append(
            f"| {r['kernel']} | {r['variant']} | {r['res']} | {r['grid']} | {c.mma_flops / 1e9:,.1f} | "
            f"{c.fp32_flops / 1e9:,.1f} | {c.exps / 1e9:,.2f} | {c.hbm_bytes / 1e6:,.1f} | {c.l2_bytes / 1e9:,.2f} | "
            f"{r['ms']:,.3f} | {r['limiter']} | {r['dense_ms']:,.3f} | {r['speedup']:,.1f}x |"
        )
    return "\n".join(lines)


def test_doc_table_is_the_computed_one():
    stale = "docs/roofline.md is stale: paste the output of `python -m tests.test_triton_roofline`"
    assert markdown_table() in DOC.read_text(), stale


def test_local_cost_degenerates_to_dense_tiles_when_the_disc_covers_the_grid():
    config = lw.default_config(HEAD_DIM, "fp16")
    side = 48  # 6 x 3 tiles of 8 x 16
    cost = lw.cost_per_call(1, 1, side, side, HEAD_DIM, radius=2 * side, config=config)
    padded = lw.dense_tiles(side, side, config.tile_h, config.tile_w) * (config.tile_h * config.tile_w) ** 2
    assert cost.mma_flops == 4.0 * padded * HEAD_DIM
    assert cost.exps == padded


def test_downsampled_cost_is_a_quarter_of_dense():
    """4 groups of N/4 tokens: (N/4)^2 * 4 = N^2 / 4 pairs (block-aligned grid, no hi/lo split)."""
    side = 64
    n = side * side
    cost = ds.cost_per_call(1, 1, side, side, HEAD_DIM, rope=False, cosine=False)
    assert cost.mma_flops == 4.0 * n * n * HEAD_DIM / 4
    assert cost.exps == n * n / 4


def test_expected_speedups():
    by_key = {(r["kernel"], r["variant"], r["res"]): r for r in rows()}
    local = [by_key[("LocalWindowAttention", "r=8", res)]["speedup"] for res in RESOLUTIONS]
    assert local == sorted(local) and local[-1] > 100  # linear cost: the gain grows with resolution
    for res in RESOLUTIONS:  # pooled tokens add work, they never make the kernel faster
        pooled = by_key[("LocalWindowAttention", "r=8, d=4", res)]["ms"]
        assert pooled > by_key[("LocalWindowAttention", "r=8", res)]["ms"]
        plain = by_key[("DownsampledAttention", "no RoPE, q.k/sqrt(D)", res)]["speedup"]
        assert 3.5 < plain <= 4.0  # a quarter of the pairs


if __name__ == "__main__":
    print(markdown_table())
