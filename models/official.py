"""Load checkpoints written by the official DiT (facebookresearch/DiT) and U-DiT (YuchuanTian/U-DiT) code.

Accepted: a bare state_dict (DiT's released DiT-XL-2-*.pt), or a train.py checkpoint dict holding "ema"
(preferred, as the official find_model does) or "model"; files in torch format or `.safetensors`.
The key names of this package's models are the official ones, so loading is strict. U-DiT checkpoints
hold the unfused training layout; call `models.reparameterize` for the fused inference form.
"""
import argparse
import math
from collections.abc import Mapping
from os import PathLike
from pathlib import Path

import torch

from .dit import DiT, Denoiser
from .registry import create_model

StateDict = Mapping[str, torch.Tensor]


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes do not fit the model; the message lists every difference."""


def read_state_dict(source: str | PathLike | StateDict) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file or dict: picks "ema", else "model", else the dict itself."""
    if isinstance(source, Mapping):
        state = source
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            # official train.py checkpoints also store the argparse Namespace under "args"
            with torch.serialization.safe_globals([argparse.Namespace]):
                state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("ema", "model"):
        if isinstance(state.get(key), Mapping):
            state = state[key]
            break
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def check_state_dict(model: torch.nn.Module, state: StateDict, label: str = "checkpoint") -> None:
    """Raise CheckpointMismatchError listing missing, unexpected and shape-mismatched keys, if any."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or mismatched):
        return

    def listing(title: str, items: list[str], limit: int = 20) -> str:
        more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
        return f"  {title} ({len(items)}):\n" + "\n".join(f"    {item}" for item in items[:limit]) + more

    parts = [listing(title, items) for title, items in (
        ("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)) if items]
    raise CheckpointMismatchError(f"{label} does not fit the model layout:\n" + "\n".join(parts))


def load_official(name: str, path_or_state_dict: str | PathLike | StateDict, **overrides) -> Denoiser:
    """Build model `name` (overrides as in `create_model`) and load an official checkpoint strictly; eval mode.

    For DiT the latent size is read from the checkpoint's position table unless `input_size` is given,
    so DiT-XL-2-512x512.pt loads with just `load_official("dit_xl_2", path)`.
    """
    state = read_state_dict(path_or_state_dict)
    model = create_model(name, **overrides)
    if isinstance(model, DiT) and "input_size" not in overrides and "pos_embed" in state:
        grid = math.isqrt(state["pos_embed"].shape[1])
        if grid * model.patch_size != model.input_size:
            model = create_model(name, input_size=grid * model.patch_size, **overrides)
    label = path_or_state_dict if isinstance(path_or_state_dict, (str, PathLike)) else "state_dict"
    check_state_dict(model, state, f"checkpoint {label} for {name}")
    model.load_state_dict(state, strict=True)
    return model.eval()
