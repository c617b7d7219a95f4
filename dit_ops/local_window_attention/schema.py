"""dit_ops::LocalWindowAttention: names, attributes, shape rule and the tile plan (numpy only, no torch).

Semantics (CLEAR): a query at (yq, xq) on the row-major token grid sees the keys with
(yq - yk)^2 + (xq - xk)^2 < radius^2, clipped at the borders. With down_factor d > 0 every query also
sees the (grid_h/d)*(grid_w/d) tokens pooled from k and v over non-overlapping d x d patches with the
learned weights pool_weight (d*d,), one softmax over disc + pooled tokens.

The tile plan is shared by the torch eager path, the ONNX function body and the Triton/TensorRT side:
queries are cut into tile_h x tile_w tiles, each tile attends to one window_h x window_w key window
(the tile plus a halo of radius - 1, clamped to the grid) under a static per-tile disc mask, so the
cost is linear in the number of tokens. Tiles and windows are clamped inside the grid rather than
padded: the last tile of a row overlaps its neighbour, so every query and key is a real token and
every query row of the mask is non-empty (it always contains the query itself).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dit_ops import DOMAIN, OPSET_VERSION, PLUGIN_NAMESPACE, PLUGIN_VERSION

OP_TYPE = "LocalWindowAttention"
TORCH_OP = f"{DOMAIN}::local_window_attention"
# 8 x 8 query tiles: at radius 8 a window is 22^2 = 484 keys per query against 30^2 = 900 with 16 x 16 tiles
# (the disc holds 193); measured 1.3x faster in ONNX Runtime at a 128^2 grid, more tiles notwithstanding.
DEFAULT_TILE = 8

# Inputs of the ONNX node, in order. pool_weight is always present (a (1,) dummy when down_factor == 0),
# so the node has a fixed arity for the function body and the TensorRT plugin.
INPUTS = ("q", "k", "v", "scale", "pool_weight")
OUTPUTS = ("out",)
# Integer attributes of the ONNX node (plus plugin_namespace / plugin_version strings).
ATTRIBUTES = (
    "num_heads", "head_dim", "grid_h", "grid_w", "radius", "down_factor",
    "tile_h", "tile_w", "window_h", "window_w",
)
__all__ = [
    "DOMAIN", "OPSET_VERSION", "PLUGIN_NAMESPACE", "PLUGIN_VERSION", "OP_TYPE", "TORCH_OP", "DEFAULT_TILE",
    "INPUTS", "OUTPUTS", "ATTRIBUTES", "validate_attributes", "check_shapes", "TilePlan", "node_attributes",
]


def validate_attributes(grid_h: int, grid_w: int, radius: int, down_factor: int) -> None:
    """Raise ValueError naming the bad attribute and its valid range."""
    for name, value in (("grid_h", grid_h), ("grid_w", grid_w), ("radius", radius), ("down_factor", down_factor)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    if grid_h < 1 or grid_w < 1:
        raise ValueError(f"grid_h and grid_w must be >= 1, got {grid_h} x {grid_w}")
    if radius < 1:
        raise ValueError(f"radius must be >= 1 (a query sees keys at distance < radius), got {radius}")
    if down_factor < 0:
        raise ValueError(f"down_factor must be 0 (no pooled tokens) or a positive patch size, got {down_factor}")
    if down_factor > 0 and (grid_h % down_factor or grid_w % down_factor):
        raise ValueError(
            f"down_factor={down_factor} must divide the token grid {grid_h} x {grid_w} "
            f"(pooled tokens come from non-overlapping {down_factor}x{down_factor} patches)"
        )


def check_shapes(
    q: tuple[int, ...], k: tuple[int, ...], v: tuple[int, ...], scale: tuple[int, ...],
    pool_weight: tuple[int, ...] | None, grid_h: int, grid_w: int, radius: int, down_factor: int,
) -> tuple[int, ...]:
    """Validate input shapes (q, k, v: (B, heads, N, D); scale: (heads,)); return the output shape."""
    validate_attributes(grid_h, grid_w, radius, down_factor)
    q, k, v = tuple(q), tuple(k), tuple(v)
    if len(q) != 4:
        raise ValueError(f"q must be (batch, heads, tokens, head_dim), got shape {q}")
    if k != q or v != q:
        raise ValueError(f"q, k, v must have the same shape, got {q}, {k}, {v}")
    if q[2] != grid_h * grid_w:
        raise ValueError(f"tokens ({q[2]}) must equal grid_h * grid_w = {grid_h} * {grid_w} = {grid_h * grid_w}")
    if tuple(scale) != (q[1],):
        raise ValueError(f"scale must have shape (heads,) = ({q[1]},), got {tuple(scale)}")
    if down_factor > 0:
        if pool_weight is None or tuple(pool_weight) != (down_factor * down_factor,):
            got = None if pool_weight is None else tuple(pool_weight)
            raise ValueError(f"down_factor={down_factor} needs pool_weight of shape ({down_factor ** 2},), got {got}")
    return q


def _clamped_starts(grid: int, tile: int, window: int, halo: int) -> tuple[np.ndarray, np.ndarray]:
    """Start of every query tile and of its key window along one axis (both clamped inside the grid)."""
    n = -(-grid // tile)
    query = np.minimum(np.arange(n) * tile, grid - tile)
    key = np.clip(query - halo, 0, grid - window)
    return query.astype(np.int64), key.astype(np.int64)


@dataclass(frozen=True)
class TilePlan:
    """Query tiles, haloed key windows and per-tile disc masks for one (grid, radius, tile)."""

    grid_h: int
    grid_w: int
    radius: int
    tile_h: int
    tile_w: int

    @classmethod
    def create(cls, grid_h: int, grid_w: int, radius: int, tile: int | tuple[int, int] = DEFAULT_TILE) -> TilePlan:
        """Plan with the tile clamped to the grid (a 4 x 100 grid with tile 16 uses 4 x 16 tiles)."""
        validate_attributes(grid_h, grid_w, radius, 0)
        tile_h, tile_w = (tile, tile) if isinstance(tile, (int, np.integer)) else tile
        if tile_h < 1 or tile_w < 1:
            raise ValueError(f"tile sizes must be >= 1, got {tile_h} x {tile_w}")
        return cls(int(grid_h), int(grid_w), int(radius), int(min(tile_h, grid_h)), int(min(tile_w, grid_w)))

    # Halo: a key at |dy| >= radius is never inside the disc, and none is farther than grid - 1.
    @property
    def halo_h(self) -> int:
        return min(self.radius - 1, self.grid_h - 1)

    @property
    def halo_w(self) -> int:
        return min(self.radius - 1, self.grid_w - 1)

    @property
    def window_h(self) -> int:
        return min(self.tile_h + 2 * self.halo_h, self.grid_h)

    @property
    def window_w(self) -> int:
        return min(self.tile_w + 2 * self.halo_w, self.grid_w)

    @property
    def tiles_h(self) -> int:
        return -(-self.grid_h // self.tile_h)

    @property
    def tiles_w(self) -> int:
        return -(-self.grid_w // self.tile_w)

    @property
    def num_tiles(self) -> int:
        return self.tiles_h * self.tiles_w

    @property
    def tile_size(self) -> int:
        """Queries per tile (Tq)."""
        return self.tile_h * self.tile_w

    @property
    def window_size(self) -> int:
        """Keys per window (Tk)."""
        return self.window_h * self.window_w

    def starts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(query_y, key_y, query_x, key_x): tile and window starts per tile row / tile column."""
        qy, ky = _clamped_starts(self.grid_h, self.tile_h, self.window_h, self.halo_h)
        qx, kx = _clamped_starts(self.grid_w, self.tile_w, self.window_w, self.halo_w)
        return qy, ky, qx, kx

    def query_index(self) -> np.ndarray:
        """(num_tiles, Tq) token index of every query of every tile (tiles and tokens row-major)."""
        qy, _, qx, _ = self.starts()
        return self._grid_index(qy, qx, self.tile_h, self.tile_w)

    def key_index(self) -> np.ndarray:
        """(num_tiles, Tk) token index of every key of every tile's window."""
        _, ky, _, kx = self.starts()
        return self._grid_index(ky, kx, self.window_h, self.window_w)

    def output_index(self) -> np.ndarray:
        """(N,) for each token, its row in the flattened (num_tiles * Tq) tile outputs.

        A token covered by two overlapping tiles (last tile of a row or column) takes the later tile.
        """
        qy, _, qx, _ = self.starts()
        y, x = np.arange(self.grid_h), np.arange(self.grid_w)
        ty = np.minimum(y // self.tile_h, self.tiles_h - 1)
        tx = np.minimum(x // self.tile_w, self.tiles_w - 1)
        tile = ty[:, None] * self.tiles_w + tx[None, :]
        inner = (y - qy[ty])[:, None] * self.tile_w + (x - qx[tx])[None, :]
        return (tile * self.tile_size + inner).reshape(-1).astype(np.int64)

    def mask(self) -> np.ndarray:
        """(num_tiles, Tq, Tk) bool: query i of a tile sees key j of its window (Euclidean disc, strict <)."""
        qy, ky, qx, kx = self.starts()
        rows_q, rows_k = qy[:, None] + np.arange(self.tile_h), ky[:, None] + np.arange(self.window_h)
        cols_q, cols_k = qx[:, None] + np.arange(self.tile_w), kx[:, None] + np.arange(self.window_w)
        dy = rows_q[:, :, None] - rows_k[:, None, :]  # (tiles_h, tile_h, window_h)
        dx = cols_q[:, :, None] - cols_k[:, None, :]  # (tiles_w, tile_w, window_w)
        # -> (tiles_h, tiles_w, tile_h, tile_w, window_h, window_w)
        d2 = (dy**2)[:, None, :, None, :, None] + (dx**2)[None, :, None, :, None, :]
        return (d2 < self.radius**2).reshape(self.num_tiles, self.tile_size, self.window_size)

    def _grid_index(self, ys: np.ndarray, xs: np.ndarray, h: int, w: int) -> np.ndarray:
        rows = ys[:, None] + np.arange(h)  # (tiles_h, h)
        cols = xs[:, None] + np.arange(w)  # (tiles_w, w)
        index = rows[:, None, :, None] * self.grid_w + cols[None, :, None, :]  # (tiles_h, tiles_w, h, w)
        return index.reshape(self.num_tiles, h * w).astype(np.int64)


def node_attributes(
    num_heads: int, head_dim: int, grid_h: int, grid_w: int, radius: int, down_factor: int,
    tile: int | tuple[int, int] = DEFAULT_TILE,
) -> dict[str, int | str]:
    """Every attribute of one LocalWindowAttention ONNX node, tile plan included."""
    validate_attributes(grid_h, grid_w, radius, down_factor)
    plan = TilePlan.create(grid_h, grid_w, radius, tile)
    return {
        "num_heads": int(num_heads), "head_dim": int(head_dim), "grid_h": int(grid_h), "grid_w": int(grid_w),
        "radius": int(radius), "down_factor": int(down_factor), "tile_h": plan.tile_h, "tile_w": plan.tile_w,
        "window_h": plan.window_h, "window_w": plan.window_w,
        "plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION,
    }
