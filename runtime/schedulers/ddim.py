"""DDIM, equal to diffusers' DDIMScheduler in the configuration DiT's diffusers conversion writes.

That configuration is `DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear",
prediction_type="epsilon", clip_sample=False)`, so the remaining defaults hold: `set_alpha_to_one=True`
(the step below t=0 lands on abar = 1), `timestep_spacing="leading"` (t_k = k * (1000 // steps)),
`steps_offset=0`. Arithmetic is float32 like diffusers'.
"""

from collections.abc import Callable

import numpy as np

from runtime.schedulers.schedule import NoiseSchedule, UnscaledInput


class DDIMScheduler(UnscaledInput):
    """x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma noise, sigma = eta * sigma_DDPM."""

    name = "ddim"
    default_steps = 50

    def __init__(self, schedule: NoiseSchedule, steps: int, eta: float = 0.0) -> None:
        if eta < 0:
            raise ValueError(f"eta must be >= 0 (0 = deterministic DDIM, 1 = DDPM-like), got {eta}")
        self.eta = np.float32(eta)
        abar = schedule.alphas_cumprod32()
        ratio = schedule.num_train_timesteps // steps
        self.timesteps = (np.arange(steps, dtype=np.int64) * ratio)[::-1].copy()
        previous = self.timesteps - ratio
        self._abar = abar[self.timesteps]
        self._abar_prev = np.where(previous >= 0, abar[np.maximum(previous, 0)], np.float32(1.0)).astype(np.float32)

    def step(
        self,
        i: int,
        x: np.ndarray,
        eps: np.ndarray,
        variance: np.ndarray | None,
        noise: Callable[[], np.ndarray],
    ) -> np.ndarray:
        """One DDIM step; `variance` channels are ignored (DDIM has no use for a learned sigma)."""
        one = np.float32(1.0)
        abar, abar_prev = self._abar[i], self._abar_prev[i]
        beta_prod = one - abar
        x0 = (x - beta_prod ** np.float32(0.5) * eps) / abar ** np.float32(0.5)
        ddpm_variance = ((one - abar_prev) / beta_prod) * (one - abar / abar_prev)
        std = self.eta * ddpm_variance ** np.float32(0.5)
        direction = (one - abar_prev - std**2) ** np.float32(0.5) * eps
        x_prev = abar_prev ** np.float32(0.5) * x0 + direction
        if self.eta > 0:
            x_prev = x_prev + std * noise()
        return x_prev
