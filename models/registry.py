"""Named configurations and `create_model(name, **overrides)`.

DiT S/B/L/XL x patch 2/4/8 and U-DiT S/B/L as published; `udit_*_vanilla` is U-DiT paper Table 10's
baseline (downsampled attention with the dwconv5 + shortcut downsampler, tanh-GELU FFN ratio 2,
scaled-dot-product logits, no RoPE). `dit_unet` is the paper's DiT-UNet toy baseline, whose config was
never published: U layout, independent per-stage embedders, plain DiT sub-layers (full self-attention,
tanh-GELU MLP ratio 4); we chose hidden 48, 2 heads, depths [1, 1, 2, 1, 1] (U_DiTBlocks of two
sub-layers): 1.386 GMACs and 5.24M parameters at 32x32, near the paper's 1.40 (DiT-S/4: 1.41). `*_tiny*` are CPU-sized
configs for tests and the default demo.
"""
import inspect

from .dit import DiT, Denoiser
from .udit import UDiT

_DIT_SIZES = {"s": (12, 384, 6), "b": (12, 768, 12), "l": (24, 1024, 16), "xl": (28, 1152, 16)}
_UDIT_SIZES = {"s": (96, 4), "b": (192, 8), "l": (384, 16)}
_VANILLA = dict(ffn="basic", cosine=False, rope=False)

CONFIGS: dict[str, tuple[type[Denoiser], dict]] = {}
for _size, (_depth, _hidden, _heads) in _DIT_SIZES.items():
    for _patch in (2, 4, 8):
        CONFIGS[f"dit_{_size}_{_patch}"] = (
            DiT, dict(depth=_depth, hidden_size=_hidden, num_heads=_heads, patch_size=_patch))
for _size, (_hidden, _heads) in _UDIT_SIZES.items():
    CONFIGS[f"udit_{_size}"] = (UDiT, dict(hidden_size=_hidden, num_heads=_heads))
for _size, (_hidden, _heads) in _UDIT_SIZES.items():
    CONFIGS[f"udit_{_size}_vanilla"] = (UDiT, dict(hidden_size=_hidden, num_heads=_heads, **_VANILLA))
CONFIGS["dit_unet"] = (UDiT, dict(
    hidden_size=48, num_heads=2, depth=[1, 1, 2, 1, 1], mlp_ratio=4.0, attention="full", **_VANILLA))
CONFIGS["dit_tiny_2"] = (DiT, dict(depth=4, hidden_size=128, num_heads=4, patch_size=2))
CONFIGS["udit_tiny"] = (UDiT, dict(hidden_size=32, num_heads=2, depth=[1, 1, 2, 1, 1]))

MODEL_NAMES: tuple[str, ...] = tuple(CONFIGS)


def canonical_name(name: str) -> str:
    """'DiT-XL/2' -> 'dit_xl_2', 'U-DiT-B' -> 'udit_b'; raises ValueError listing the valid names."""
    key = str(name).strip().lower().replace("-", "_").replace("/", "_")
    key = "udit" + key[len("u_dit"):] if key.startswith("u_dit") else key
    if key not in CONFIGS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    return key


def create_model(name: str, **overrides) -> Denoiser:
    """Model `name` with any constructor argument overridden (input_size, in_channels, num_classes, ...)."""
    key = canonical_name(name)
    cls, defaults = CONFIGS[key]
    valid = list(inspect.signature(cls).parameters)
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise TypeError(f"{key} got unknown argument(s) {', '.join(unknown)}; valid arguments: {', '.join(valid)}")
    model = cls(**{**defaults, **overrides})
    model.name = key
    return model
