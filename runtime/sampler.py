"""Sampler: class-conditional sampling of an exported package with numpy and ONNX Runtime only.

The loop is DiT's: latents ~ N(0, I) from one generator per sample, a batch-doubled denoiser call
[x; x] with labels [y; null] for classifier-free guidance, guidance on the first `cfg.channels` output
channels (3 in official DiT / U-DiT, all latent channels for diffusers sources), the scheduler update on
the conditional half, then the VAE decoder (or, for pixel-space packages, [-1, 1] -> [0, 1]).
"""

import contextlib
import math
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtime.images import to_uint8
from runtime.manifest import load_manifest, resolve, verify_files
from runtime.schedulers import NoiseSchedule, Scheduler, default_steps, make_scheduler
from runtime.sessions import Session, check_provider, open_session, releasing_arena_run_options, trim_heap

OUTPUT_TYPES = ("uint8", "latent")
PIXEL_RANGE = (-1.0, 1.0)  # pixel-space models are trained on images normalised to [-1, 1]


class Sampler:
    """Samples images from a package directory written by `dit-export`.

    Construction validates the manifest, checks every file's sha256 and opens the sessions; calls are
    independent and may run concurrently from several threads (all per-call state is local).

    low_memory=True holds one model's weights at a time: the denoiser is closed before the VAE decode and
    opened again by the next call, so the peak is the larger phase's, not the sum of both models and the
    decode's activations (DiT-S/2 + SD-VAE at 256 px: 589 vs 723-737 MB). It costs one denoiser open per
    call (~0.2 s for DiT-S/2 on 2 cores), and calls then run one at a time. Pixel-space packages have no
    decode and ignore it.
    """

    def __init__(
        self,
        package_dir: str | Path,
        provider: str = "cpu",
        precision: str = "fp32",
        strict: bool = False,
        threads: int | None = None,
        low_memory: bool = False,
    ) -> None:
        check_provider(provider, threads)
        self.package_dir = Path(package_dir)
        self.manifest = manifest = load_manifest(self.package_dir)
        precisions = manifest["denoiser"]["precisions"]
        if precision not in precisions:
            raise ValueError(
                f"precision {precision!r} is not in this package; available: {', '.join(precisions)}"
            )
        runnable_on = precisions[precision].get("runnable_on")
        if runnable_on is not None and provider not in runnable_on:
            raise ValueError(
                f"precision {precision!r} runs only on provider {', '.join(runnable_on)}, not {provider!r}: "
                f"{precisions[precision].get('note', '')}".rstrip(": ")
            )
        verify_files(self.package_dir, manifest)

        self.precision = precision
        self.latent_shape = tuple(manifest["latent"][key] for key in ("channels", "height", "width"))
        self.num_classes = manifest["classes"]["num_classes"]
        self.null_label = manifest["classes"]["null_label"]
        self.learn_sigma = manifest["learn_sigma"]
        self.schedule = NoiseSchedule.from_manifest(manifest["diffusion"])
        self.cfg_channels = manifest["cfg"]["channels"]
        denoiser = precisions[precision]
        inputs = {spec["name"]: spec for spec in denoiser["inputs"]}
        self._timestep_dtype = np.dtype(inputs["t"]["dtype"])
        self._denoiser_output = denoiser["outputs"][0]["name"]
        self._vae_spec = manifest["vae_decoder"]
        self._denoiser_path = resolve(self.package_dir, denoiser["file"])
        self._threads = threads
        self._vae = None
        if self._vae_spec is None:
            self._check_pixel_space(manifest["image"])
        else:
            # the decoder first: its load-time transient then passes before the denoiser's weights arrive
            self._vae, provider = open_session(resolve(self.package_dir, self._vae_spec["file"]), provider,
                                               strict=strict, threads=threads, arena=False)
        self._denoiser, self.provider = open_session(self._denoiser_path, provider, strict=strict, threads=threads)
        self.low_memory = low_memory and self._vae is not None
        self._one_call_at_a_time = threading.Lock()
        # before a CPU decode, the last denoising step gives the denoiser's arena back (a low-memory sampler
        # closes the whole session there instead)
        decodes_on_cpu = self._vae is not None and self.provider == "cpu" and not self.low_memory
        self._last_step_options = releasing_arena_run_options() if decodes_on_cpu else None

    def __call__(
        self,
        class_labels: int | Sequence[int] | np.ndarray,
        steps: int | None = None,
        guidance_scale: float = 4.0,
        scheduler: str = "ddpm",
        seed: int | Sequence[int] = 0,
        latents: np.ndarray | None = None,
        eta: float = 0.0,
        cfg_channels: int | str | None = None,
        progress: Callable[[int, int], None] | None = None,
        output_type: str = "uint8",
    ) -> np.ndarray:
        """Sample one image per label; returns uint8 (N, H, W, C), or float32 latents for output_type="latent".

        steps: None = 250 for "ddpm" (DiT's sample.py), 50 otherwise (DiTPipeline).
        guidance_scale: 4.0 as DiT's sample.py and DiTPipeline; exactly 1 skips the unconditional half.
        seed: an int gives sample i the seed `seed + i`; a list gives one seed per sample. Sample i's
            generator PCG64(seed_i) yields its initial noise first (drawn even when `latents` is given),
            then one noise tensor per stochastic step, so an image depends only on (seed, label).
        latents: (N, C, h, w) initial noise replacing the drawn one; scaled by the scheduler's
            init_noise_sigma like the drawn noise (only euler's differs from 1).
        cfg_channels: guided eps channels, an int or "all"; None = the manifest's cfg.channels.
        progress: called as progress(step, total) after each denoising step.
        Learned sigma: "ddpm" uses the variance channels; the other schedulers drop them (as DiTPipeline).
        """
        labels = self._check_labels(class_labels)
        count = len(labels)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown output_type {output_type!r}; valid choices: {', '.join(OUTPUT_TYPES)}")
        if not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale}")
        steps = default_steps(scheduler) if steps is None else steps
        solver = make_scheduler(scheduler, self.schedule, steps, learn_sigma=self.learn_sigma, eta=eta)
        self._check_timesteps(solver)
        guided = self._guided_channels(cfg_channels)
        generators = [np.random.Generator(np.random.PCG64(s)) for s in self._check_seeds(seed, count)]

        def draw_noise() -> np.ndarray:
            return np.stack([g.standard_normal(self.latent_shape, dtype=np.float32) for g in generators])

        x = draw_noise()
        if latents is not None:
            x = self._check_latents(latents, count)
        x = x * solver.init_noise_sigma
        decode = output_type != "latent"
        with self._one_call_at_a_time if self.low_memory else contextlib.nullcontext():
            if self._denoiser is None:  # closed by the last low-memory decode
                self._denoiser, _ = open_session(self._denoiser_path, self.provider, strict=True,
                                                 threads=self._threads)
            x = self._denoise(self._denoiser, solver, x, labels, float(guidance_scale), guided, draw_noise, progress,
                              decode)
            if not decode:
                return x
            if self.low_memory:
                self._denoiser = None  # its weights leave before the decode's activations arrive
                trim_heap()
            return self._decode(x)

    def _denoise(
        self,
        denoiser: Session,
        solver: Scheduler,
        x: np.ndarray,
        labels: np.ndarray,
        guidance_scale: float,
        guided_channels: int,
        draw_noise: Callable[[], np.ndarray],
        progress: Callable[[int, int], None] | None,
        decode_follows: bool,
    ) -> np.ndarray:
        count, total = len(labels), len(solver.timesteps)
        last_options = self._last_step_options if decode_follows else None
        use_cfg = guidance_scale != 1.0
        if use_cfg:
            labels = np.concatenate([labels, np.full(count, self.null_label, np.int64)])
        for i, t in enumerate(solver.timesteps):
            model_input = solver.scale_model_input(x, i)
            if use_cfg:
                model_input = np.concatenate([model_input, model_input])
            feeds = {
                "x": np.ascontiguousarray(model_input, dtype=np.float32),
                "t": np.full(len(labels), t, dtype=self._timestep_dtype),
                "y": labels,
            }
            if i == total - 1 and last_options is not None:
                out = denoiser.run([self._denoiser_output], feeds, last_options)[0]
            else:
                out = denoiser.run([self._denoiser_output], feeds)[0]
            eps, variance = self._guide(out, count, guidance_scale if use_cfg else None, guided_channels)
            x = solver.step(i, x, eps, variance, draw_noise)
            if progress is not None:
                progress(i + 1, total)
        return x

    def _guide(
        self, out: np.ndarray, count: int, scale: float | None, guided_channels: int
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Split eps / variance channels and apply guidance; the variance keeps the conditional half."""
        channels = self.latent_shape[0]
        expected = 2 * channels if self.learn_sigma else channels
        if out.ndim != 4 or out.shape[1] != expected:
            raise RuntimeError(
                f"denoiser returned shape {out.shape}; the manifest (latent channels {channels}, "
                f"learn_sigma {self.learn_sigma}) implies {expected} output channels"
            )
        eps = out[:, :channels]
        variance = out[:count, channels:] if self.learn_sigma else None
        if scale is None:
            return eps, variance
        cond, uncond = eps[:count, :guided_channels], eps[count:, :guided_channels]
        mixed = uncond + np.float32(scale) * (cond - uncond)
        return np.concatenate([mixed, eps[:count, guided_channels:]], axis=1), variance

    def _decode(self, x: np.ndarray) -> np.ndarray:
        """Latents -> uint8 images; the VAE runs one sample at a time to bound peak memory."""
        if self._vae is None:
            return to_uint8(x, PIXEL_RANGE)
        spec = self._vae_spec
        images = [self._vae.run([spec["output"]], {spec["input"]: x[i : i + 1]})[0] for i in range(len(x))]
        low, high = spec.get("output_range", [0, 1])
        return to_uint8(np.concatenate(images), (low, high))

    def _check_labels(self, class_labels: Any) -> np.ndarray:
        labels = np.atleast_1d(np.asarray(class_labels))
        if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"class_labels must be one integer or a non-empty list of integers, got {class_labels!r}")
        bad = [int(v) for v in labels if not (0 <= v < self.num_classes or v == self.null_label)]
        if bad:
            raise ValueError(
                f"class labels {bad} out of range: valid labels are 0..{self.num_classes - 1}, "
                f"or {self.null_label} (the null label) for unconditional samples"
            )
        return labels.astype(np.int64)

    @staticmethod
    def _check_seeds(seed: Any, count: int) -> list[int]:
        seeds = [seed + i for i in range(count)] if isinstance(seed, (int, np.integer)) else list(seed)
        if len(seeds) != count:
            raise ValueError(f"got {len(seeds)} seeds for {count} class labels; give one seed per sample or one int")
        for value in seeds:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"seeds must be non-negative integers, got {value!r}")
        return [int(value) for value in seeds]

    def _check_latents(self, latents: np.ndarray, count: int) -> np.ndarray:
        latents = np.asarray(latents, dtype=np.float32)
        expected = (count, *self.latent_shape)
        if latents.shape != expected:
            raise ValueError(f"latents must have shape {expected} (one per class label), got {latents.shape}")
        return latents

    def _check_timesteps(self, solver: Scheduler) -> None:
        timesteps = solver.timesteps
        if np.issubdtype(self._timestep_dtype, np.integer) and np.any(timesteps != np.round(timesteps)):
            raise ValueError(
                f"scheduler {solver.name!r} uses fractional timesteps but this package's denoiser takes "
                f"int64 t; use ddpm, ddim or dpm++2m, or export the denoiser with a float32 t"
            )

    def _guided_channels(self, option: int | str | None) -> int:
        """Number of guided eps channels; the manifest's value is capped at the latent channel count."""
        channels = self.latent_shape[0]
        if option is None:
            return channels if self.cfg_channels == "all" else min(self.cfg_channels, channels)
        if option == "all":
            return channels
        if isinstance(option, bool) or not isinstance(option, (int, np.integer)) or not 1 <= option <= channels:
            raise ValueError(f"cfg_channels must be 'all' or an integer in 1..{channels}, got {option!r}")
        return int(option)

    def _check_pixel_space(self, image: dict[str, Any] | None) -> None:
        if image is not None and tuple(image[k] for k in ("channels", "height", "width")) != self.latent_shape:
            raise ValueError(
                f"package has no VAE decoder, so its samples are the images, but manifest image {image} "
                f"differs from latent {self.manifest['latent']}"
            )
