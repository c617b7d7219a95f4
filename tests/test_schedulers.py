"""Numpy schedulers vs their references, step by step, with identical model outputs and noise.

The fake model is a deterministic function of (x, t), so any difference in timesteps, input scaling or
update arithmetic shows up in the trajectory. References: diffusers' schedulers (test-only dependency)
and, for ddpm, diffusers' DDPMScheduler on DiT's respaced grid with variance_type="learned_range",
which computes the same ADM posterior from alpha-bar at the kept timesteps.
"""

import numpy as np
import pytest

from runtime.schedulers import NoiseSchedule, make_scheduler, space_timesteps

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

CHANNELS = 4
SHAPE = (2, CHANNELS, 8, 8)
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


ABAR = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
DATA_VARIANCE = 0.25


def fake_model(x: np.ndarray, t: float, learned: bool) -> np.ndarray:
    """A plausible denoiser: the ideal eps for N(0, 0.25) data plus a nonlinear term in x and t.

    Plausible matters: a model that does not denoise makes ddpm trajectories explode, and float32
    rounding of the large values then swamps the comparison. Fractional t (euler) interpolates abar.
    The variance channels stay in [-1, 1] like DiT's.
    """
    abar = np.interp(t, np.arange(1000), ABAR)
    gain = np.sqrt(1.0 - abar) / (abar * DATA_VARIANCE + 1.0 - abar)
    t = np.float32(t)
    eps = np.float32(gain) * x + np.float32(0.1) * np.tanh(x + t / np.float32(1000.0))
    if not learned:
        return eps.astype(np.float32)
    variance = np.sin(np.float32(0.3) * x + t / np.float32(250.0))
    return np.concatenate([eps, variance], axis=1).astype(np.float32)


def noise_stream(steps: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(steps)]


def initial_latents() -> np.ndarray:
    return np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)


def run_numpy(name: str, steps: int, noises: list[np.ndarray], learned: bool = True, eta: float = 0.0):
    scheduler = make_scheduler(name, NoiseSchedule(), steps, learn_sigma=learned, eta=eta)
    queue = iter(noises)
    x = initial_latents() * scheduler.init_noise_sigma
    trajectory, model_timesteps = [], []
    for i, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(x, i)
        out = fake_model(model_input, t, learned)
        variance = out[:, CHANNELS:] if learned else None
        x = scheduler.step(i, x, out[:, :CHANNELS], variance, lambda: next(queue))
        trajectory.append(x)
        model_timesteps.append(t)
    return np.stack(trajectory), np.array(model_timesteps)


def run_diffusers(scheduler, steps: int | None, noises, learned: bool, step_kwargs=None, timesteps=None):
    """The scheduler loop of a diffusers pipeline, with correct init_noise_sigma handling."""
    if timesteps is None:
        scheduler.set_timesteps(steps)
    else:
        scheduler.set_timesteps(timesteps=timesteps)
    x = torch.from_numpy(initial_latents()) * scheduler.init_noise_sigma
    trajectory, model_timesteps = [], []
    for i, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(x, t)
        out = torch.from_numpy(fake_model(model_input.numpy(), float(t), learned))
        kwargs = step_kwargs(i) if step_kwargs else {}
        x = scheduler.step(out, t, x, **kwargs).prev_sample
        trajectory.append(x.numpy())
        model_timesteps.append(float(t))
    return np.stack(trajectory), np.array(model_timesteps)


@pytest.mark.parametrize("steps", [1, 7, 50])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_diffusers(steps, eta):
    noises = noise_stream(steps)
    ours, ours_t = run_numpy("ddim", steps, noises, learned=False, eta=eta)
    reference = diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon", clip_sample=False
    )
    step_kwargs = lambda i: {"eta": eta, "variance_noise": torch.from_numpy(noises[i]) if eta > 0 else None}
    theirs, theirs_t = run_diffusers(reference, steps, noises, learned=False, step_kwargs=step_kwargs)
    np.testing.assert_array_equal(ours_t, theirs_t)
    np.testing.assert_allclose(ours, theirs, **TOLERANCE)


@pytest.mark.parametrize("steps", [1, 2, 10, 25])
def test_dpm_solver_matches_diffusers(steps):
    ours, ours_t = run_numpy("dpm++2m", steps, [], learned=False)
    theirs, theirs_t = run_diffusers(diffusers.DPMSolverMultistepScheduler(), steps, [], learned=False)
    np.testing.assert_array_equal(ours_t, theirs_t)
    np.testing.assert_allclose(ours, theirs, **TOLERANCE)


@pytest.mark.parametrize("steps", [1, 3, 50])
def test_euler_matches_diffusers(steps):
    ours, ours_t = run_numpy("euler", steps, [], learned=False)
    reference = diffusers.EulerDiscreteScheduler()
    theirs, theirs_t = run_diffusers(reference, steps, [], learned=False)
    np.testing.assert_array_equal(ours_t, theirs_t)
    np.testing.assert_allclose(ours, theirs, **TOLERANCE)
    scheduler = make_scheduler("euler", NoiseSchedule(), steps)
    assert scheduler.timesteps.dtype == np.float32
    assert scheduler.init_noise_sigma == pytest.approx(float(reference.init_noise_sigma), rel=1e-7)


def test_euler_timesteps_are_fractional_and_noise_is_scaled():
    scheduler = make_scheduler("euler", NoiseSchedule(), 50)
    assert scheduler.timesteps[0] == 999.0 and scheduler.timesteps[1] == pytest.approx(978.612, abs=1e-3)
    assert scheduler.init_noise_sigma == pytest.approx(157.4, abs=0.1)


@pytest.mark.parametrize(("steps", "learned"), [(250, True), (25, True), (10, True), (50, False)])
def test_ddpm_matches_respaced_diffusers_ddpm(steps, learned, monkeypatch):
    noises = noise_stream(steps)
    ours, ours_t = run_numpy("ddpm", steps, noises, learned=learned)
    queue = iter(noises)
    monkeypatch.setattr(
        diffusers.schedulers.scheduling_ddpm, "randn_tensor", lambda *a, **k: torch.from_numpy(next(queue))
    )
    reference = diffusers.DDPMScheduler(
        variance_type="learned_range" if learned else "fixed_large", clip_sample=False
    )
    grid = sorted(space_timesteps(1000, steps), reverse=True)
    theirs, theirs_t = run_diffusers(reference, None, noises, learned=learned, timesteps=grid)
    np.testing.assert_array_equal(ours_t, theirs_t)
    np.testing.assert_allclose(ours, theirs, **TOLERANCE)


def adm_reference(steps: int, noises: list[np.ndarray], learned: bool) -> np.ndarray:
    """ADM's p_sample loop written from the formulas of the DiT spec, in float64 throughout."""
    kept = space_timesteps(1000, steps)
    abar_full = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
    last, betas = 1.0, []
    for index in kept:
        betas.append(1.0 - abar_full[index] / last)
        last = abar_full[index]
    betas = np.array(betas)
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
    clipped_log = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
    fixed_large_log = np.log(np.append(posterior_variance[1], betas[1:]))
    x = initial_latents().astype(np.float64)
    trajectory = []
    for step, k in enumerate(range(steps - 1, -1, -1)):
        out = fake_model(x.astype(np.float32), kept[k], learned).astype(np.float64)
        eps = out[:, :CHANNELS]
        x0 = np.sqrt(1.0 / abar[k]) * x - np.sqrt(1.0 / abar[k] - 1.0) * eps
        mean = betas[k] * np.sqrt(abar_prev[k]) / (1.0 - abar[k]) * x0
        mean += (1.0 - abar_prev[k]) * np.sqrt(1.0 - betas[k]) / (1.0 - abar[k]) * x
        if learned:
            frac = (out[:, CHANNELS:] + 1.0) / 2.0
            log_variance = frac * np.log(betas[k]) + (1.0 - frac) * clipped_log[k]
        else:
            log_variance = fixed_large_log[k]
        x = mean + (k != 0) * np.exp(0.5 * log_variance) * noises[step]
        trajectory.append(x)
    return np.stack(trajectory)


@pytest.mark.parametrize(("steps", "learned"), [(3, True), (10, True), (250, True), (50, False)])
def test_ddpm_matches_float64_adm_formulas(steps, learned):
    noises = noise_stream(steps)
    ours, _ = run_numpy("ddpm", steps, noises, learned=learned)
    np.testing.assert_allclose(ours, adm_reference(steps, noises, learned), **TOLERANCE)


def test_ddpm_respacing_grid_is_dits():
    kept = space_timesteps(1000, 250)
    assert len(kept) == 250 and kept[:4] == [0, 4, 8, 12]
    assert kept[-5:] == [983, 987, 991, 995, 999]
    scheduler = make_scheduler("ddpm", NoiseSchedule(), 250)
    assert scheduler.timesteps.dtype == np.int64
    np.testing.assert_array_equal(scheduler.timesteps, kept[::-1])
    assert space_timesteps(1000, 1000) == list(range(1000))
    assert space_timesteps(1000, 1) == [0]
    abar = np.cumprod(1.0 - NoiseSchedule().betas64())
    assert abar[-1] == pytest.approx(4.0358e-05, rel=1e-4)


def test_ddpm_uses_the_learned_variance():
    """With a learned variance of +1 the step noise is sqrt(beta_k); with -1 the posterior variance."""
    scheduler = make_scheduler("ddpm", NoiseSchedule(), 250)
    x = np.zeros(SHAPE, np.float32)
    eps = np.zeros(SHAPE, np.float32)
    unit = np.ones(SHAPE, np.float32)
    high = scheduler.step(0, x, eps, unit, lambda: unit)
    low = scheduler.step(0, x, eps, -unit, lambda: unit)
    abar = np.cumprod(1.0 - NoiseSchedule().betas64())
    beta = 1.0 - abar[999] / abar[995]
    posterior = beta * (1.0 - abar[995]) / (1.0 - abar[999])
    np.testing.assert_allclose(high, np.sqrt(beta), rtol=1e-6)
    np.testing.assert_allclose(low, np.sqrt(posterior), rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(name="heun", steps=10), "valid choices: ddpm, ddim, dpm\\+\\+2m, euler"),
        (dict(name="ddim", steps=0), "between 1 and num_train_timesteps=1000"),
        (dict(name="ddpm", steps=1001), "between 1 and num_train_timesteps=1000"),
        (dict(name="euler", steps=10, eta=0.5), "only applies to the 'ddim'"),
        (dict(name="ddim", steps=10, eta=-1.0), "eta must be >= 0"),
    ],
)
def test_bad_scheduler_arguments(kwargs, message):
    name, steps = kwargs.pop("name"), kwargs.pop("steps")
    with pytest.raises(ValueError, match=message):
        make_scheduler(name, NoiseSchedule(), steps, **kwargs)


def test_bad_schedule_and_step_type():
    with pytest.raises(ValueError, match="valid choices: linear"):
        NoiseSchedule(beta_schedule="cosine")
    with pytest.raises(TypeError, match="steps must be an integer"):
        make_scheduler("ddim", NoiseSchedule(), 2.5)
