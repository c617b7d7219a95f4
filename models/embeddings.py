"""Embeddings shared by DiT and U-DiT: timestep, class label and 2-D sin-cos positions.

All formulas follow the official code bit for bit; checkpoints depend on it. (U-DiT's RoPE2D lives with
its attention op: `dit_ops.downsampled_attention.reference`.)
"""
import math

import numpy as np
import torch
import torch.nn as nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation `x * (1 + scale) + shift`; shift and scale come shaped to broadcast over tokens/pixels."""
    return x * (1 + scale) + shift


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """GLIDE/ADM sinusoidal embedding of (possibly fractional) timesteps, cos half first.

    freq_i = exp(-ln(max_period) * i / half), i < half; returns [cos(t * freq), sin(t * freq)] (N, dim).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepEmbedder(nn.Module):
    """Timestep -> 256 sinusoidal frequencies -> Linear, SiLU, Linear (keys mlp.0 / mlp.2)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
    """Class table with one extra row, `num_classes`, for the null label of classifier-free guidance.

    In training mode each label is independently replaced by the null label with `dropout_prob`.
    The null row always exists (also with dropout 0) so that guidance works for every model.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> np.ndarray:
    """MAE fixed 2-D sin-cos table (grid_size**2, embed_dim), float64, tokens row-major.

    Token (row r, col c) gets [sin(c w), cos(c w), sin(r w), cos(r w)], w_k = 10000^(-k / (D/4)):
    the COLUMN index fills the first half (the official meshgrid order), each block D/4 wide.
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.divmod(np.arange(grid_size * grid_size, dtype=np.float64), grid_size)
    col_args, row_args = np.outer(cols, omega), np.outer(rows, omega)
    return np.concatenate([np.sin(col_args), np.cos(col_args), np.sin(row_args), np.cos(row_args)], axis=1)

