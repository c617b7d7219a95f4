"""The training noise schedule every sampler starts from.

Two precisions are kept on purpose: DiT's ADM diffusion builds its tables in float64 numpy, while
diffusers builds them in float32 torch (cumulative product accumulated in double, as torch does on CPU).
Matching each reference's arithmetic is what keeps trajectories equal to 1e-5.
"""

from dataclasses import dataclass
from typing import Any

import numpy as np

BETA_SCHEDULES = ("linear",)


@dataclass(frozen=True)
class NoiseSchedule:
    """Linear betas over `num_train_timesteps` training steps (DiT, U-DiT and diffusers' DiT)."""

    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: str = "linear"

    def __post_init__(self) -> None:
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(
                f"unknown beta_schedule {self.beta_schedule!r}; valid choices: {', '.join(BETA_SCHEDULES)}"
            )
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be an integer >= 2, got {self.num_train_timesteps!r}")
        if not 0.0 < self.beta_start < self.beta_end < 1.0:
            raise ValueError(
                f"betas must satisfy 0 < beta_start < beta_end < 1, got {self.beta_start} and {self.beta_end}"
            )

    @classmethod
    def from_manifest(cls, diffusion: dict[str, Any]) -> "NoiseSchedule":
        """Read the manifest's `diffusion` section; keys other than the four schedule keys are ignored."""
        return cls(
            num_train_timesteps=int(diffusion.get("num_train_timesteps", 1000)),
            beta_start=float(diffusion.get("beta_start", 1e-4)),
            beta_end=float(diffusion.get("beta_end", 0.02)),
            beta_schedule=str(diffusion.get("beta_schedule", "linear")),
        )

    def betas64(self) -> np.ndarray:
        """Betas as ADM's `get_named_beta_schedule("linear")` makes them: float64 linspace."""
        return np.linspace(self.beta_start, self.beta_end, self.num_train_timesteps, dtype=np.float64)

    def alphas_cumprod32(self) -> np.ndarray:
        """alpha-bar as diffusers' schedulers hold it: float32 betas and alphas, cumprod accumulated in double."""
        betas = self.betas64().astype(np.float32)
        alphas = np.float32(1.0) - betas
        return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


class UnscaledInput:
    """Schedulers whose initial noise is N(0, I) and whose model input is the sample itself (all but euler)."""

    init_noise_sigma = np.float32(1.0)

    def scale_model_input(self, x: np.ndarray, i: int) -> np.ndarray:
        return x
