"""Sampler on a hand-made package vs a diffusers-scheduler reference loop with DiT's CFG semantics.

The reference is written independently of runtime/: diffusers' schedulers (DDPMScheduler on DiT's
respaced grid with the learned range for ddpm), the fixture's numpy forward pass for the denoiser and
VAE, the batch-doubled guidance of DiT's forward_with_cfg, and the documented noise streams (sample i:
PCG64(seed_i) yields its initial noise, then one tensor per stochastic step).
"""

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from runtime import Sampler
from runtime.schedulers import space_timesteps
from tests.runtime_fixtures import NUM_CLASSES, build_package

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TOLERANCE = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return build_package(tmp_path_factory.mktemp("package"), extra_precisions=("int8",))


@pytest.fixture(scope="module")
def sampler(package):
    return Sampler(package[0])


def diffusers_scheduler(name: str, steps: int):
    if name == "ddpm":
        scheduler = diffusers.DDPMScheduler(variance_type="learned_range", clip_sample=False)
        scheduler.set_timesteps(timesteps=sorted(space_timesteps(1000, steps), reverse=True))
        return scheduler
    scheduler = {
        "ddim": lambda: diffusers.DDIMScheduler(beta_schedule="linear", clip_sample=False),
        "dpm++2m": diffusers.DPMSolverMultistepScheduler,
        "euler": diffusers.EulerDiscreteScheduler,
    }[name]()
    scheduler.set_timesteps(steps)
    return scheduler


def reference_latents(model, name, labels, seeds, steps, scale, guided, monkeypatch, latents=None):
    """DiT-style sampling loop on diffusers' schedulers; returns the final latents."""
    shape = (model.channels, 8, 8)
    generators = [np.random.Generator(np.random.PCG64(seed)) for seed in seeds]
    draw = lambda: torch.from_numpy(np.stack([g.standard_normal(shape, dtype=np.float32) for g in generators]))
    initial = draw()
    monkeypatch.setattr(diffusers.schedulers.scheduling_ddpm, "randn_tensor", lambda *a, **k: draw())
    scheduler = diffusers_scheduler(name, steps)
    x = (initial if latents is None else torch.from_numpy(latents)) * scheduler.init_noise_sigma
    n, c = len(labels), model.channels
    y = np.concatenate([labels, np.full(n, NUM_CLASSES)]) if scale != 1 else np.asarray(labels)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        if scale != 1:
            model_input = torch.cat([model_input, model_input])
        out = torch.from_numpy(model.denoise(model_input.numpy(), float(t), y))
        eps, rest = out[:, :c], out[:n, c:]
        if scale != 1:
            cond, uncond = eps[:n], eps[n:]
            mixed = uncond[:, :guided] + scale * (cond[:, :guided] - uncond[:, :guided])
            eps = torch.cat([mixed, cond[:, guided:]], dim=1)
        model_output = torch.cat([eps, rest], dim=1) if name == "ddpm" else eps
        x = scheduler.step(model_output, t, x).prev_sample
    return x.numpy()


@pytest.mark.parametrize(
    ("scheduler", "steps"), [("ddpm", 20), ("ddim", 10), ("dpm++2m", 10), ("euler", 10)]
)
@pytest.mark.parametrize(("cfg_channels", "guided"), [(None, 3), ("all", 4)])
def test_latents_match_reference_loop(sampler, package, scheduler, steps, cfg_channels, guided, monkeypatch):
    labels, seeds = [1, 7, 10], [3, 4, 5]
    ours = sampler(
        labels, steps=steps, scheduler=scheduler, seed=seeds, cfg_channels=cfg_channels, output_type="latent"
    )
    reference = reference_latents(package[1], scheduler, labels, seeds, steps, 4.0, guided, monkeypatch)
    assert ours.dtype == np.float32 and np.isfinite(ours).all()
    np.testing.assert_allclose(ours, reference, **TOLERANCE)


def test_images_are_the_decoded_latents(sampler, package):
    latents = sampler([2, 5], steps=5, scheduler="ddim", seed=11, output_type="latent")
    images = sampler([2, 5], steps=5, scheduler="ddim", seed=11)
    assert images.dtype == np.uint8 and images.shape == (2, 16, 16, 3)
    expected = np.rint(np.clip(package[1].decode(latents), 0, 1) * 255).transpose(0, 2, 3, 1)
    assert np.abs(images.astype(int) - expected).max() <= 1


def test_guidance_scale_one_skips_the_unconditional_half(sampler, package, monkeypatch):
    batches = []
    original = sampler._denoiser

    class Recorder:
        def run(self, names, feeds):
            batches.append(len(feeds["y"]))
            return original.run(names, feeds)

    monkeypatch.setattr(sampler, "_denoiser", Recorder())
    ours = sampler([4, 9], steps=4, scheduler="dpm++2m", guidance_scale=1.0, seed=0, output_type="latent")
    assert batches == [2] * 4
    sampler([4, 9], steps=4, scheduler="dpm++2m", guidance_scale=1.5, seed=0, output_type="latent")
    assert batches[4:] == [4] * 4
    monkeypatch.undo()
    reference = reference_latents(package[1], "dpm++2m", [4, 9], [0, 1], 4, 1.0, 3, monkeypatch)
    np.testing.assert_allclose(ours, reference, **TOLERANCE)


def test_latents_argument_replaces_the_initial_noise(sampler, package, monkeypatch):
    latents = np.random.default_rng(5).standard_normal((2, 4, 8, 8)).astype(np.float32)
    ours = sampler([0, 3], steps=6, scheduler="euler", latents=latents, output_type="latent")
    reference = reference_latents(package[1], "euler", [0, 3], [0, 1], 6, 4.0, 3, monkeypatch, latents)
    np.testing.assert_allclose(ours, reference, **TOLERANCE)


def test_sample_depends_only_on_seed_and_label(sampler):
    """ddpm draws noise at every step: batch [a, b] and b alone must still give the same image b."""
    pair = sampler([3, 8], steps=12, scheduler="ddpm", seed=[21, 42])
    alone = sampler([8], steps=12, scheduler="ddpm", seed=[42])
    np.testing.assert_array_equal(pair[1], alone[0])
    assert not np.array_equal(pair[0], pair[1])
    # An int seed s gives sample i the seed s + i.
    np.testing.assert_array_equal(sampler([3, 8], steps=12, seed=21), sampler([3, 8], steps=12, seed=[21, 22]))


@pytest.mark.parametrize("low_memory", [False, True])
def test_threads_share_one_sampler(package, sampler, low_memory):
    sampler = Sampler(package[0], low_memory=True) if low_memory else sampler  # low memory: calls take turns
    jobs = [
        dict(class_labels=[1, 2], scheduler="dpm++2m", steps=8, seed=1),
        dict(class_labels=[3], scheduler="ddpm", steps=10, seed=2),
        dict(class_labels=[4, 5, 6], scheduler="euler", steps=8, seed=3),
        dict(class_labels=[7], scheduler="ddim", steps=8, seed=4, eta=0.5),
    ] * 2
    sequential = [sampler(**job) for job in jobs]
    barrier = threading.Barrier(4)

    def run(job):
        barrier.wait()
        return sampler(**job)

    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(pool.map(run, jobs))
    for expected, got in zip(sequential, threaded):
        np.testing.assert_array_equal(got, expected)


def test_progress_reports_every_step(sampler):
    calls = []
    sampler([1], steps=5, scheduler="ddim", progress=lambda step, total: calls.append((step, total)))
    assert calls == [(i, 5) for i in range(1, 6)]


def test_precision_picks_its_file(package, sampler):
    int8 = Sampler(package[0], precision="int8")
    assert int8.precision == "int8"
    a = sampler([1], steps=3, scheduler="ddim", output_type="latent")
    b = int8([1], steps=3, scheduler="ddim", output_type="latent")
    assert not np.allclose(a, b)


def test_default_steps_and_scheduler(sampler):
    calls = []
    sampler([1], progress=lambda step, total: calls.append(total))
    assert calls[-1] == 250  # ddpm, DiT's 250 respaced steps
    sampler([1], scheduler="euler", progress=lambda step, total: calls.append(total))
    assert calls[-1] == 50


def test_null_label_samples_unconditionally(sampler):
    images = sampler([NUM_CLASSES], steps=3, scheduler="ddim")
    assert images.shape == (1, 16, 16, 3)


def test_pixel_space_package_maps_samples_from_minus_one_one(tmp_path, monkeypatch):
    path, model = build_package(tmp_path / "pixel", pixel=True, learn_sigma=False, cfg_channels="all")
    pixel = Sampler(path)
    latents = pixel([2, 6], steps=6, scheduler="ddim", seed=9, output_type="latent")
    images = pixel([2, 6], steps=6, scheduler="ddim", seed=9)
    assert images.shape == (2, 8, 8, 3)
    np.testing.assert_array_equal(images, np.rint(np.clip(latents / 2 + 0.5, 0, 1) * 255).transpose(0, 2, 3, 1))
    reference = reference_latents(model, "ddim", [2, 6], [9, 10], 6, 4.0, 3, monkeypatch)
    np.testing.assert_allclose(latents, reference, **TOLERANCE)


def test_ddpm_without_learned_sigma_uses_fixed_large(tmp_path):
    path, _ = build_package(tmp_path / "fixed", learn_sigma=False)
    images = Sampler(path)([1, 2], steps=10, scheduler="ddpm", seed=0)
    assert images.shape == (2, 16, 16, 3)


def test_int64_timestep_package(tmp_path, monkeypatch):
    path, model = build_package(tmp_path / "int64", timestep_dtype="int64")
    int_sampler = Sampler(path)
    ours = int_sampler([5], steps=7, scheduler="dpm++2m", seed=3, output_type="latent")
    reference = reference_latents(model, "dpm++2m", [5], [3], 7, 4.0, 3, monkeypatch)
    np.testing.assert_allclose(ours, reference, **TOLERANCE)
    with pytest.raises(ValueError, match="fractional timesteps"):
        int_sampler([5], steps=7, scheduler="euler")
