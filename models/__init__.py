"""Model zoo: DiT and U-DiT at published parity, CLEAR local attention, re-parameterisation, official loading.

    model = models.create_model("udit_s")          # unfused training layout, official key names
    fused = models.reparameterize(model)           # inference layout, new model
    local = models.linearize(model, radius=8)      # CLEAR local-window attention, new model
    model = models.load_official("dit_xl_2", "DiT-XL-2-256x256.pt")

`models.diffusion` (DiT's Gaussian diffusion) is imported on first access.
"""
import importlib

from .dit import DiT, Denoiser
from .flops import count_macs, count_params
from .linearize import linearize
from .official import CheckpointMismatchError, load_official
from .registry import MODEL_NAMES, create_model
from .reparameterize import reparameterize
from .udit import UDiT

__all__ = [
    "MODEL_NAMES", "create_model", "reparameterize", "linearize", "load_official", "count_macs", "count_params",
    "CheckpointMismatchError", "DiT", "UDiT", "Denoiser", "diffusion",
]


def __getattr__(name: str):
    if name == "diffusion":
        return importlib.import_module(".diffusion", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
