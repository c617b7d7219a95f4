"""Fused inference form of a model: `reparameterize(model)` (U-DiT re-param FFN and downsampler shortcut).

Works on a deep copy and writes fresh tensors, so the input model is never touched (the official
FeedForward.train(False) adds into its own dwconv weight in place; a second eval() corrupts it).
"""
import copy

import torch
import torch.nn as nn

from .dit import Denoiser
from .udit import DownSampler, DownsampledAttention, FusedFeedForward, RepFeedForward, UDiT


@torch.no_grad()
def fuse_feedforward(ffn: RepFeedForward) -> FusedFeedForward:
    """Merge each 1x1 pair into one 1x1 and the identity + dw5 + dw3 + dw1 branches into one depthwise 5x5."""
    in1, in2 = ffn.project_in
    out1, out2 = ffn.project_out
    dw5, dw3, dw1 = ffn.dwconv
    with torch.device(in1.weight.device):
        fused = FusedFeedForward(in1.in_channels, dw5.out_channels).to(in1.weight.dtype)

    def merge_pair(first: nn.Conv2d, second: nn.Conv2d, target: nn.Conv2d) -> None:
        w1, w2 = first.weight[:, :, 0, 0], second.weight[:, :, 0, 0]
        target.weight.copy_((w2 @ w1)[:, :, None, None])
        target.bias.copy_(w2 @ first.bias + second.bias)

    merge_pair(in1, in2, fused.project_in)
    merge_pair(out1, out2, fused.project_out)
    kernel = dw5.weight.clone()
    kernel[:, :, 1:4, 1:4] += dw3.weight
    kernel[:, :, 2, 2] += dw1.weight[:, :, 0, 0] + 1.0  # + 1: the identity branch
    fused.dwconv.weight.copy_(kernel)
    fused.dwconv.bias.copy_(dw5.bias + dw3.bias + dw1.bias)
    return fused


@torch.no_grad()
def fold_shortcut(downsampler: DownSampler) -> None:
    """dwconv5(x) + x == dwconv5'(x) with 1 added to the centre tap; rewrites the weight as a new tensor."""
    if not downsampler.shortcut:
        return
    kernel = downsampler.layer.weight.clone()
    kernel[:, :, 2, 2] += 1.0
    downsampler.layer.weight = nn.Parameter(kernel, requires_grad=downsampler.layer.weight.requires_grad)
    downsampler.shortcut = False


def reparameterize(model: Denoiser) -> Denoiser:
    """New eval-mode model in the fused inference layout; DiT (nothing to fuse) is copied as is.

    The result's `config["reparameterized"]` is True, so `create_model(name, **config)` rebuilds the fused
    layout and loads its state_dict.
    """
    if not isinstance(model, Denoiser):
        raise TypeError(f"expected a DiT or U-DiT model, got {type(model).__name__}")
    clone = copy.deepcopy(model)
    if isinstance(clone, UDiT) and not clone.config["reparameterized"]:
        for block in clone.blocks():
            for s in (1, 2):
                if isinstance(getattr(block, f"mlp{s}"), RepFeedForward):
                    setattr(block, f"mlp{s}", fuse_feedforward(getattr(block, f"mlp{s}")))
                attention = getattr(block, f"attn{s}")
                if isinstance(attention, DownsampledAttention):
                    fold_shortcut(attention.downsampler)
        clone.config = {**clone.config, "reparameterized": True}
    return clone.eval()
