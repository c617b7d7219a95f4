"""LocalWindowAttention Triton kernel under the Triton interpreter (CPU) against the dense torch definition,
and the tile-visit count that the acceptance criterion is asserted on.

The kernels run in a fresh interpreter with TRITON_INTERPRET=1: triton fixes interpreter or compiler mode
when it is first imported, and other test modules import it through torch first.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("triton")
torch = pytest.importorskip("torch")

from dit_ops.local_window_attention import schema  # noqa: E402
from dit_ops.local_window_attention import triton_kernel as tk  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-3}

CASES = [  # grid_h, grid_w, radius, down_factor, head_dim, tile (h, w), dtype
    (7, 9, 3, 0, 24, (4, 4), "fp32"),  # odd grid, partial tiles on both borders
    (8, 12, 2, 4, 16, (4, 4), "fp32"),  # pooled tokens
    (5, 16, 6, 0, 20, (2, 8), "fp32"),  # non-square tiles, radius larger than the grid height
    (1, 13, 3, 0, 16, (1, 16), "fp32"),  # a single token row
    (9, 5, 4, 0, 24, (4, 4), "fp16"),
    (8, 8, 3, 2, 32, (4, 4), "fp16"),  # pooled tokens in fp16
]

WORKER = r"""
import json, sys
import torch
from dit_ops.local_window_attention import triton_kernel as tk
from dit_ops.local_window_attention.reference import dense_local_window_attention

results = []
for grid_h, grid_w, radius, down, head_dim, tile, dtype in json.loads(sys.argv[1]):
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    torch.manual_seed(grid_h * 100 + grid_w)
    batch, heads = 1, 2
    q, k, v = (torch.randn(batch, heads, grid_h * grid_w, head_dim).to(dtype) for _ in range(3))
    scale = (torch.rand(heads) + 0.3).to(dtype)
    pool_weight = (torch.rand(max(down * down, 1)) / max(down * down, 1)).to(dtype)
    config = tk.TileConfig(*tile, block_p=16)
    programs = tk.launch_grid(batch, heads, grid_h, grid_w, config)
    visits = torch.zeros(programs[0] * programs[1], dtype=torch.int32)
    out = tk.local_window_attention(q, k, v, scale, pool_weight, grid_h, grid_w, radius, down, config, visits)
    ref = dense_local_window_attention(
        q.float(), k.float(), v.float(), scale.float(), grid_h=grid_h, grid_w=grid_w, radius=radius,
        down_factor=down, pool_weight=pool_weight.float() if down else None,
    )
    results.append({
        "error": float((out.float() - ref).abs().max() / ref.abs().max()),
        "same_dtype": out.dtype == dtype,
        "visits_per_head": visits.view(batch * heads, programs[0]).sum(dim=1).tolist(),
        "min_visits": int(visits.min()),
    })
print(json.dumps(results))
"""


def run_interpreted(worker: str, cases: list) -> list[dict]:
    """Run `worker` on the cases in a fresh Python with TRITON_INTERPRET=1; returns its JSON results."""
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", worker, json.dumps(cases)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def interpreted() -> list[dict]:
    return run_interpreted(WORKER, CASES)


@pytest.mark.parametrize("case", range(len(CASES)), ids=[str(c) for c in CASES])
def test_kernel_matches_dense_reference(interpreted, case):
    grid_h, grid_w, radius, _, _, tile, dtype = CASES[case]
    result = interpreted[case]
    assert result["same_dtype"]
    assert result["error"] < TOLERANCE[dtype]
    # every (batch, head) row of programs computed exactly the key tiles the counting function predicts
    assert result["visits_per_head"] == [tk.visited_tiles(grid_h, grid_w, radius, *tile)] * 2
    assert result["min_visits"] >= 1  # a query always sees itself


def brute_force_visited(grid_h: int, grid_w: int, radius: int, tile_h: int, tile_w: int) -> int:
    """Tile pairs holding at least one (query, key) pair inside the disc, from the dense definition."""
    y, x = np.divmod(np.arange(grid_h * grid_w), grid_w)
    allowed = (y[:, None] - y[None, :]) ** 2 + (x[:, None] - x[None, :]) ** 2 < radius**2
    tile = (y // tile_h) * -(-grid_w // tile_w) + x // tile_w
    pairs = set(zip(tile[np.nonzero(allowed)[0]].tolist(), tile[np.nonzero(allowed)[1]].tolist()))
    return len(pairs)


@pytest.mark.parametrize("grid_h, grid_w, radius, tile", [
    (11, 13, 3, (4, 4)), (9, 20, 5, (2, 8)), (16, 16, 1, (4, 4)), (6, 7, 9, (4, 2)), (32, 24, 8, (8, 16)),
])
def test_visited_tiles_is_exactly_the_tiles_with_a_pair_in_the_disc(grid_h, grid_w, radius, tile):
    assert tk.visited_tiles(grid_h, grid_w, radius, *tile) == brute_force_visited(grid_h, grid_w, radius, *tile)


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_acceptance_512_grid_radius_8_computes_under_2_percent_of_dense_tiles(dtype):
    config = tk.default_config(64, dtype)
    visited = tk.visited_tiles(512, 512, 8, config.tile_h, config.tile_w)
    dense = tk.dense_tiles(512, 512, config.tile_h, config.tile_w)
    assert visited / dense < 0.02
    # the skip rule removes tiles of the haloed window beyond the disc's corners
    tiles = dense**0.5
    assert visited < tiles * 12


def test_two_d_tiles_beat_row_blocks():
    """Same 128 queries per tile: an 8 x 16 tile visits far fewer key tiles than a 1 x 128 strip."""
    square = tk.visited_tiles(256, 256, 16, 8, 16) * 128 * 128
    strip = tk.visited_tiles(256, 256, 16, 1, 128) * 128 * 128
    assert strip > 1.5 * square


def test_bad_inputs_name_the_problem():
    q = torch.zeros(1, 2, 12, 16)
    with pytest.raises(ValueError, match="grid_h \\* grid_w"):
        tk.local_window_attention(q, q, q, torch.ones(2), torch.ones(1), 3, 5, 2, 0)
    with pytest.raises(ValueError, match="power of two"):
        tk.TileConfig(3, 4)
    with pytest.raises(ValueError, match="dtype must be one of"):
        tk.default_config(64, "bf16")
    with pytest.raises(ValueError, match="contiguous"):
        t = torch.zeros(1, 12, 2, 16).transpose(1, 2)
        tk.local_window_attention(t, t, t, torch.ones(2), torch.ones(1), 3, 4, 2, 0)


def test_plugin_attributes_are_node_attributes():
    assert set(tk.PLUGIN_ATTRIBUTES) <= set(schema.ATTRIBUTES)
    assert tk.PLUGIN_ID == "dit_ops::LocalWindowAttention"
