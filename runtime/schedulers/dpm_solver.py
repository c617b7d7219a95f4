"""DPM-Solver++(2M), equal to diffusers' DPMSolverMultistepScheduler with its defaults.

Defaults mirrored: solver_order=2, algorithm_type="dpmsolver++" (data prediction), solver_type="midpoint",
lower_order_final=True, final_sigmas_type="zero", timestep_spacing="linspace" (steps + 1 points on
[0, T-1], rounded, reversed, last dropped), sigmas interpolated linearly in t. The first step is first
order (no history yet) and the last one lands on sigma = 0, i.e. on the data prediction itself.
Arithmetic is float32 like diffusers'.
"""

from collections.abc import Callable

import numpy as np

from runtime.schedulers.schedule import NoiseSchedule, UnscaledInput


def _alpha_sigma_lambda(sigma: np.float32) -> tuple[np.float32, np.float32, np.float32]:
    """VP parameters of a noise level sigma = sqrt((1 - abar) / abar): alpha_t, sigma_t, log-SNR lambda_t."""
    alpha = np.float32(1.0) / (sigma**2 + np.float32(1.0)) ** np.float32(0.5)
    sigma_t = sigma * alpha
    return alpha, sigma_t, np.log(alpha) - np.log(sigma_t)


class DPMSolverMultistepScheduler(UnscaledInput):
    """Multistep DPM-Solver++: exponential integrator on x0 predictions, midpoint second-order correction."""

    name = "dpm++2m"
    default_steps = 50

    def __init__(self, schedule: NoiseSchedule, steps: int) -> None:
        last = schedule.num_train_timesteps - 1
        abar = schedule.alphas_cumprod32()
        self.timesteps = np.linspace(0, last, steps + 1).round()[::-1][:-1].astype(np.int64)
        train_sigmas = ((np.float32(1.0) - abar) / abar) ** np.float32(0.5)
        sigmas = np.interp(self.timesteps, np.arange(last + 1), train_sigmas)
        self._sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self._previous_x0: np.ndarray | None = None

    def step(
        self,
        i: int,
        x: np.ndarray,
        eps: np.ndarray,
        variance: np.ndarray | None,
        noise: Callable[[], np.ndarray],
    ) -> np.ndarray:
        """One solver step from sigmas[i] to sigmas[i + 1]; call with i = 0, 1, 2, ... in order."""
        alpha_s0, sigma_s0, lambda_s0 = _alpha_sigma_lambda(self._sigmas[i])
        x0 = (x - sigma_s0 * eps) / alpha_s0
        previous_x0, self._previous_x0 = self._previous_x0, x0
        if i == len(self.timesteps) - 1:
            # First order onto sigma = 0: alpha = 1 and sigma_t / sigma_s = 0 leave exactly x0.
            return x0
        alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(self._sigmas[i + 1])
        h = lambda_t - lambda_s0
        phi = alpha_t * (np.exp(-h) - np.float32(1.0))
        if i == 0:
            return (sigma_t / sigma_s0) * x - phi * x0
        _, _, lambda_s1 = _alpha_sigma_lambda(self._sigmas[i - 1])
        r0 = (lambda_s0 - lambda_s1) / h
        d1 = (np.float32(1.0) / r0) * (x0 - previous_x0)
        return (sigma_t / sigma_s0) * x - phi * x0 - (np.float32(0.5) * phi) * d1
