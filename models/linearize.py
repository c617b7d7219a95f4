"""CLEAR local-window attention for any DiT / U-DiT: `linearize(model, radius, down_factor=None)`.

Every self-attention layer gets a `LocalWindow`: a query sees the keys at Euclidean distance < radius on
its token grid, clipped at the borders (Liu et al., CLEAR), optionally plus (grid/d)^2 tokens pooled from
k and v by a learned d x d weighting initialised as the mean. Cost is linear in tokens (the
`dit_ops::local_window_attention` op). Grids: DiT's patch grid; U-DiT's half-resolution group grid
(grouping, RoPE2D and cosine logits are kept); the DiT-UNet baseline's full stage grid.
"""
import copy

import torch
import torch.nn as nn

from dit_ops.local_window_attention.reference import local_window_attention

from .dit import Attention, Denoiser, DiT
from .udit import DownsampledAttention, FullAttention, UDiT

ATTENTION_LAYERS = (Attention, DownsampledAttention, FullAttention)


class LocalWindow(nn.Module):
    """CLEAR window of one attention layer; owns the learnable pooling weights when down_factor > 0."""

    def __init__(self, radius: int, down_factor: int = 0):
        super().__init__()
        self.radius = radius
        self.down_factor = down_factor
        if down_factor:
            self.pool_weight = nn.Parameter(torch.full((down_factor * down_factor,), 1.0 / down_factor**2))
        else:
            self.register_parameter("pool_weight", None)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, grid_h: int, grid_w: int
    ) -> torch.Tensor:
        return local_window_attention(
            q, k, v, scale, grid_h=grid_h, grid_w=grid_w, radius=self.radius,
            down_factor=self.down_factor, pool_weight=self.pool_weight,
        )

    def extra_repr(self) -> str:
        return f"radius={self.radius}, down_factor={self.down_factor}"


def smallest_attention_grid(model: Denoiser) -> int:
    """Side of the smallest token grid any attention layer sees at the model's configured input size."""
    if isinstance(model, DiT):
        return model.grid_size
    if isinstance(model, UDiT):
        return model.input_size // model.size_multiple
    raise TypeError(f"expected a DiT or U-DiT model, got {type(model).__name__}")


def linearize(model: Denoiser, radius: int, down_factor: int | None = None) -> Denoiser:
    """Deep copy of `model` with every self-attention replaced by CLEAR local-window attention.

    radius: disc radius in tokens of each layer's grid (a radius beyond the grid diagonal is full attention).
    down_factor: None/0 for the plain disc, d > 0 to add learned d x d pooled key/value tokens; d must divide
    the token grids. The copy records its settings in `attention_config` for config.json / manifest.json.
    """
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < 1:
        raise ValueError(f"radius must be an int >= 1 (keys at distance < radius are seen), got {radius!r}")
    d = 0 if down_factor is None else down_factor
    if isinstance(d, bool) or not isinstance(d, int) or d < 0:
        raise ValueError(f"down_factor must be None, 0 or a positive int, got {down_factor!r}")
    grid = smallest_attention_grid(model)
    if d and grid % d:
        raise ValueError(
            f"down_factor={d} must divide every attention token grid; the smallest one is {grid}x{grid} "
            f"at input_size={model.input_size}"
        )
    if model.attention_config.get("kind") != "full":
        raise ValueError(f"model already uses {model.attention_config} attention; linearize the full-attention model")
    clone = copy.deepcopy(model)
    reference = next(clone.parameters())
    for module in clone.modules():
        if isinstance(module, ATTENTION_LAYERS):
            module.window = LocalWindow(radius, d).to(device=reference.device, dtype=reference.dtype)
    clone.attention_config = {"kind": "local", "radius": radius, "down_factor": d}
    return clone
