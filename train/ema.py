"""Exponential moving average of the model weights (DiT reports every result with EMA weights)."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


class EMA:
    """ema = decay_t * ema + (1 - decay_t) * model after every optimizer step, over all parameters and buffers.

    DiT uses a fixed decay of 0.9999 from a copy of the initial weights. `warmup=True` uses
    decay_t = min(decay, (1 + step) / (10 + step)) instead, so a run of a few thousand steps is not dominated
    by the random initialisation (the default MNIST preset relies on it).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Blend in `model` (the unwrapped module) after optimizer step number `step` (1-based)."""
        weight = 1.0 - self.decay_at(step)
        ema_state, state = self.model.state_dict(), model.state_dict()
        floats = [name for name, value in ema_state.items() if value.is_floating_point()]
        torch._foreach_lerp_([ema_state[n] for n in floats], [state[n].to(ema_state[n].dtype) for n in floats], weight)
        for name, value in ema_state.items():
            if not value.is_floating_point():
                value.copy_(state[name])
