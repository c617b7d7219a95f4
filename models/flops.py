"""Parameter and multiply-accumulate (MAC) counts, the papers' "GFLOPs" convention.

MACs follow torchprofile's profile_macs, which reproduces the DiT and U-DiT tables: every Linear and
Conv2d (output elements x input fan-in) plus the two attention matmuls (QK^T and AV) per layer, batch 1.
Elementwise work (norms, modulation, softmax) is not counted. Attention matmuls are counted from shapes:
full attention N^2 pairs, U-DiT downsampled attention 4 groups x (N/4)^2 = N^2/4 pairs, CLEAR the exact
number of (query, key) pairs inside the clipped discs plus the pooled tokens (the ideal work, not the
tile overlap an implementation may spend). Runs on the meta device, so the largest models never allocate:

    with torch.device("meta"):
        model = create_model("dit_xl_2")
    count_macs(model)  # 118.6e9
"""
import numpy as np
import torch
import torch.nn as nn

from .dit import Attention, Denoiser
from .udit import DownsampledAttention, FullAttention


def count_params(model: nn.Module) -> int:
    """All parameters, frozen ones included (DiT's pos_embed counts in the published totals)."""
    return sum(p.numel() for p in model.parameters())


def attended_pairs(grid_h: int, grid_w: int, window: nn.Module | None) -> int:
    """(query, key) pairs one attention sequence on a grid_h x grid_w grid scores."""
    n = grid_h * grid_w
    if window is None:
        return n * n
    r = window.radius
    dy, dx = np.meshgrid(np.arange(-r + 1, r), np.arange(-r + 1, r), indexing="ij")
    inside = dy**2 + dx**2 < r**2
    # queries with a valid key at offset (dy, dx): (grid_h - |dy|) * (grid_w - |dx|), clipped at zero
    counts = np.clip(grid_h - np.abs(dy), 0, None) * np.clip(grid_w - np.abs(dx), 0, None)
    pairs = int(counts[inside].sum())
    if window.down_factor:
        pairs += n * (n // window.down_factor**2)
    return pairs


def attention_macs(module: nn.Module, args: tuple) -> int:
    """QK^T + AV MACs (plus the k/v pooling of a CLEAR window) of one attention call, from its input shape."""
    if isinstance(module, Attention):  # DiT: (B, N, C) tokens and the grid as arguments
        x, grid_h, grid_w = args
        sequences, channels = x.shape[0], x.shape[-1]
    else:  # U-DiT layers take the channels-last (B, H, W, C) map
        (x,) = args
        sequences, grid_h, grid_w, channels = x.shape
        if isinstance(module, DownsampledAttention):
            sequences, grid_h, grid_w = 4 * sequences, grid_h // 2, grid_w // 2
    window = module.window
    macs = 2 * sequences * channels * attended_pairs(grid_h, grid_w, window)
    if window is not None and window.down_factor:
        macs += 2 * sequences * channels * grid_h * grid_w
    return macs


def qkv_macs(module: nn.Module, args: tuple) -> int:
    """MACs of an attention layer's fused qkv projection, which it applies as three products on slices of
    the Linear's weight (`models.dit.qkv_heads`), so the Linear's own forward hook never fires."""
    qkv = module.qkv if isinstance(module, Attention) else module.to_qkv
    tokens = args[0].shape[:-1].numel()
    return tokens * qkv.in_features * qkv.out_features


def count_macs(model: Denoiser, input_size: int | tuple[int, int] | None = None, batch: int = 1) -> int:
    """Forward MACs of model(x, t, y) for a (batch, C, H, W) latent (default: the model's input_size).

    Runs one eval-mode forward on the model's device (use the meta device for large models).
    """
    size = model.input_size if input_size is None else input_size
    h, w = (size, size) if isinstance(size, int) else size
    reference = next(model.parameters())
    x = torch.zeros(batch, model.in_channels, h, w, device=reference.device, dtype=reference.dtype)
    t = torch.zeros(batch, device=reference.device)
    y = torch.zeros(batch, dtype=torch.long, device=reference.device)
    total = 0

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Linear):
            total += output.numel() * module.in_features
        elif isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += output.numel() * (module.in_channels // module.groups) * kh * kw
        else:
            total += attention_macs(module, args) + qkv_macs(module, args)

    counted = (nn.Linear, nn.Conv2d, Attention, DownsampledAttention, FullAttention)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, counted)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x, t, y)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return total
