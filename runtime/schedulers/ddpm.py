"""Ancestral DDPM sampling exactly as DiT samples: ADM's respaced diffusion with a learned variance.

DiT's `sample.py` builds `create_diffusion(str(steps))`: the 1000 training steps are respaced to
`space_timesteps(1000, [steps])` (250 steps keep {0, 4, 8, ..., 995, 999}), the respaced betas are
`1 - abar[s_k] / abar[s_{k-1}]`, the model sees the original index s_k, and the variance is
LEARNED_RANGE (or FIXED_LARGE for a model without learned sigma). Tables are float64 as in ADM and
are applied to float32 latents, as ADM's `_extract_into_tensor` does.
"""

from collections.abc import Callable

import numpy as np

from runtime.schedulers.schedule import NoiseSchedule, UnscaledInput


def space_timesteps(num_timesteps: int, count: int) -> list[int]:
    """ADM's `space_timesteps(num_timesteps, [count])`: `count` evenly strided indices, both ends kept.

    The stride is accumulated in floating point and rounded with Python's round, exactly as ADM
    does, so the kept set is identical (e.g. 250 of 1000 -> 0, 4, 8, ..., 983, 987, 991, 995, 999).
    """
    if not 1 <= count <= num_timesteps:
        raise ValueError(f"cannot respace {num_timesteps} timesteps to {count}; use 1..{num_timesteps} steps")
    stride = 1.0 if count == 1 else (num_timesteps - 1) / (count - 1)
    kept, position = [], 0.0
    for _ in range(count):
        kept.append(round(position))
        position += stride
    return kept


class DDPMScheduler(UnscaledInput):
    """DiT's ADM sampler: x_{k-1} = posterior mean from predicted x0 + exp(logvar / 2) * noise."""

    name = "ddpm"
    default_steps = 250

    def __init__(self, schedule: NoiseSchedule, steps: int, learn_sigma: bool = True) -> None:
        self.learn_sigma = learn_sigma
        kept = np.array(space_timesteps(schedule.num_train_timesteps, steps), dtype=np.int64)
        base_abar = np.cumprod(1.0 - schedule.betas64())[kept]
        betas = 1.0 - base_abar / np.append(1.0, base_abar[:-1])
        abar = np.cumprod(1.0 - betas)
        abar_prev = np.append(1.0, abar[:-1])
        posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        # Loop index i walks the respaced chain backwards: tables are stored in that order.
        reverse = slice(None, None, -1)
        self.timesteps = kept[reverse].copy()
        self._sqrt_recip_abar = np.sqrt(1.0 / abar)[reverse].astype(np.float32)
        self._sqrt_recipm1_abar = np.sqrt(1.0 / abar - 1.0)[reverse].astype(np.float32)
        self._mean_coef_x0 = (betas * np.sqrt(abar_prev) / (1.0 - abar))[reverse].astype(np.float32)
        self._mean_coef_xt = ((1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar))[reverse].astype(np.float32)
        # Noise is only added above the last respaced step, where ADM's "clipped" posterior log-variance
        # and FIXED_LARGE's substituted first entry coincide with the plain formulas used here.
        with np.errstate(divide="ignore"):
            self._min_log = np.log(posterior_variance)[reverse].astype(np.float32)
        self._max_log = np.log(betas)[reverse].astype(np.float32)

    def step(
        self,
        i: int,
        x: np.ndarray,
        eps: np.ndarray,
        variance: np.ndarray | None,
        noise: Callable[[], np.ndarray],
    ) -> np.ndarray:
        """One ancestral step; `variance` is the model's variance channels in [-1, 1] (learned sigma)."""
        x0 = self._sqrt_recip_abar[i] * x - self._sqrt_recipm1_abar[i] * eps
        mean = self._mean_coef_x0[i] * x0 + self._mean_coef_xt[i] * x
        if i == len(self.timesteps) - 1:
            return mean
        if self.learn_sigma:
            if variance is None:
                raise ValueError("ddpm with learned sigma needs the model's variance channels")
            frac = (variance + np.float32(1.0)) / np.float32(2.0)
            log_variance = frac * self._max_log[i] + (np.float32(1.0) - frac) * self._min_log[i]
        else:
            log_variance = self._max_log[i]
        return mean + np.exp(np.float32(0.5) * log_variance) * noise()
