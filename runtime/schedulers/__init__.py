"""Numpy samplers, one per file, each equal to its reference (ADM for ddpm, diffusers otherwise).

A scheduler object holds the state of ONE sampling call (the multistep history of dpm++2m), so the
Sampler builds a fresh one per call; that is what makes a shared Sampler thread-safe.
"""

from collections.abc import Callable
from typing import Protocol

import numpy as np

from runtime.schedulers.ddim import DDIMScheduler
from runtime.schedulers.ddpm import DDPMScheduler, space_timesteps
from runtime.schedulers.dpm_solver import DPMSolverMultistepScheduler
from runtime.schedulers.euler import EulerDiscreteScheduler
from runtime.schedulers.schedule import NoiseSchedule


class Scheduler(Protocol):
    """What the sampling loop needs: the model timesteps, input scaling and one update per step."""

    name: str
    default_steps: int
    timesteps: np.ndarray  # what the denoiser receives as t, in loop order (int64, float32 for euler)
    init_noise_sigma: np.float32

    def scale_model_input(self, x: np.ndarray, i: int) -> np.ndarray: ...

    def step(
        self,
        i: int,
        x: np.ndarray,
        eps: np.ndarray,
        variance: np.ndarray | None,
        noise: Callable[[], np.ndarray],
    ) -> np.ndarray: ...


SCHEDULERS: dict[str, type] = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "dpm++2m": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
}


def default_steps(name: str) -> int:
    """250 for ddpm (DiT's sample.py), 50 for the others (DiTPipeline's num_inference_steps)."""
    return _scheduler_class(name).default_steps


def make_scheduler(
    name: str, schedule: NoiseSchedule, steps: int, *, learn_sigma: bool = True, eta: float = 0.0
) -> Scheduler:
    """A fresh scheduler for one sampling call; `eta` is DDIM's and is refused elsewhere."""
    cls = _scheduler_class(name)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise TypeError(f"steps must be an integer, got {steps!r}")
    if not 1 <= steps <= schedule.num_train_timesteps:
        raise ValueError(
            f"steps must be between 1 and num_train_timesteps={schedule.num_train_timesteps}, got {steps}"
        )
    if eta != 0.0 and name != "ddim":
        raise ValueError(f"eta={eta} only applies to the 'ddim' scheduler, not {name!r}")
    if name == "ddpm":
        return DDPMScheduler(schedule, int(steps), learn_sigma=learn_sigma)
    if name == "ddim":
        return DDIMScheduler(schedule, int(steps), eta=eta)
    return cls(schedule, int(steps))


def _scheduler_class(name: str) -> type:
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; valid choices: {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name]


__all__ = [
    "SCHEDULERS",
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "EulerDiscreteScheduler",
    "NoiseSchedule",
    "Scheduler",
    "default_steps",
    "make_scheduler",
    "space_timesteps",
]
