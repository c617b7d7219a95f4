"""Nearest 2x upsampling followed by a 3x3 convolution, computed without the upsampled tensor.

Output pixel (2m + a, 2k + b) of conv3x3(upsample(x)) reads only input rows m - 1 + a, m + a and columns
k - 1 + b, k + b, with the 3x3 taps that land on the same input pixel summed. So each of the four output
phases (a, b) is a 2x2 convolution of x, and the four are interleaved: 4/9 of the multiply-adds, and the
4x larger upsampled tensor is never built. The SD-VAE decoder spends ~87 of its ~311 GMAC at 256 px in the
three upsampler convolutions. Exact up to float rounding (the summed taps).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

# PHASE_TAPS[a] maps the 3 kernel rows (offsets -1, 0, +1 in the upsampled image) to the 2 input rows
# that output phase a reads: phase 0 reads rows m-1 (tap -1) and m (taps 0, +1); phase 1 reads m (taps
# -1, 0) and m+1 (tap +1). The same holds for columns.
PHASE_TAPS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]],
                           [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])


class PhaseUpsampleConv(nn.Module):
    """conv(F.interpolate(x, scale_factor=2, mode="nearest")) for a 3x3, stride 1, padding 1 conv."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if not is_plain_3x3(conv):
            raise ValueError(f"PhaseUpsampleConv needs a 3x3, stride 1, padding 1, ungrouped Conv2d, got {conv}")
        taps = PHASE_TAPS.to(conv.weight.dtype)
        # (2, 2, out, in, 2, 2): phase (a, b)'s 2x2 kernel = taps[a] @ w @ taps[b]^T per (out, in) pair
        self.weight = nn.Parameter(torch.einsum("apk,bql,oikl->aboipq", taps, taps, conv.weight.detach()),
                                   requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = []
        for a in (0, 1):
            # phase (a, b) reads input rows m - 1 + a .. m + a: pad 1 - a above and a below (columns alike)
            cols = [F.conv2d(F.pad(x, (1 - b, b, 1 - a, a)), self.weight[a, b], self.bias) for b in (0, 1)]
            rows.append(torch.stack(cols, dim=-1).flatten(-2))  # (N, C, H, 2W): column 2k + b
        return torch.stack(rows, dim=-2).flatten(-3, -2)  # (N, C, 2H, 2W): row 2m + a


def is_plain_3x3(conv: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


class _PhaseUpsampler(nn.Module):
    """Stands in for a diffusers Upsample2D; falls back to it when an explicit output_size is asked for."""

    def __init__(self, upsampler: nn.Module):
        super().__init__()
        self.original = upsampler
        self.phases = PhaseUpsampleConv(upsampler.conv)

    def forward(self, hidden_states: torch.Tensor, output_size=None, *args, **kwargs) -> torch.Tensor:
        if output_size is not None:
            return self.original(hidden_states, output_size)
        return self.phases(hidden_states)


def phase_upsamplers(module: nn.Module) -> tuple[nn.Module, int]:
    """A copy of `module` whose nearest-2x-then-3x3-conv diffusers upsamplers run as PhaseUpsampleConv,
    and how many were replaced (upsamplers of any other form are left as they are)."""
    from diffusers.models.upsampling import Upsample2D

    module = copy.deepcopy(module)
    targets = [(name, child) for name, child in module.named_modules()
               if isinstance(child, Upsample2D) and getattr(child, "interpolate", True) and child.use_conv
               and not child.use_conv_transpose and child.norm is None and child.name == "conv"
               and is_plain_3x3(child.conv)]
    for name, child in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        if isinstance(parent, nn.ModuleList):
            parent[int(attr)] = _PhaseUpsampler(child)
        else:
            setattr(parent, attr, _PhaseUpsampler(child))
    return module, len(targets)
