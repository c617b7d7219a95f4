"""Euler, equal to diffusers' EulerDiscreteScheduler with its defaults.

Defaults mirrored: timestep_spacing="linspace" (float timesteps on [0, T-1], not rounded, so the
denoiser receives float32 t), interpolation_type="linear", final_sigmas_type="zero", no Karras
sigmas, s_churn=0. Unlike DiTPipeline (which forgets it), the initial noise is scaled by
init_noise_sigma = sigma_max and the model input by 1 / sqrt(sigma^2 + 1). Arithmetic is float32.
"""

from collections.abc import Callable

import numpy as np

from runtime.schedulers.schedule import NoiseSchedule


class EulerDiscreteScheduler:
    """Euler steps of the probability-flow ODE in sigma: x_next = x + (x - x0) / sigma * (sigma_next - sigma)."""

    name = "euler"
    default_steps = 50

    def __init__(self, schedule: NoiseSchedule, steps: int) -> None:
        last = schedule.num_train_timesteps - 1
        abar = schedule.alphas_cumprod32()
        self.timesteps = np.linspace(0, last, steps, dtype=np.float32)[::-1].copy()
        train_sigmas = ((np.float32(1.0) - abar) / abar) ** np.float32(0.5)
        sigmas = np.interp(self.timesteps, np.arange(last + 1), train_sigmas)
        self._sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self.init_noise_sigma = self._sigmas.max()

    def scale_model_input(self, x: np.ndarray, i: int) -> np.ndarray:
        return x / (self._sigmas[i] ** 2 + np.float32(1.0)) ** np.float32(0.5)

    def step(
        self,
        i: int,
        x: np.ndarray,
        eps: np.ndarray,
        variance: np.ndarray | None,
        noise: Callable[[], np.ndarray],
    ) -> np.ndarray:
        """One Euler step from sigmas[i] to sigmas[i + 1] on the unscaled sample x."""
        sigma = self._sigmas[i]
        x0 = x - sigma * eps
        derivative = (x - x0) / sigma
        return x + derivative * (self._sigmas[i + 1] - sigma)
