"""Gaussian diffusion of DiT (the IDDPM / ADM formulation) in torch.

DiT trains with a linear beta schedule over 1000 steps, predicts epsilon plus a per-pixel interpolation
`v` between the smallest and largest admissible variances ("learned range"), and optimises
MSE(eps) + VLB where the VLB only trains the variance (the mean is detached). Sampling uses the same
formulas on a respaced subset of the timesteps; the model always sees the original 0..999 index.

All schedule arithmetic is float64 (as in DiT); values are gathered per sample and cast to the input dtype.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, original timestep index) -> output


def linear_betas(num_timesteps: int = 1000) -> torch.Tensor:
    """DiT/ADM linear schedule: 1e-4..0.02 for 1000 steps, scaled by 1000/T so other T keep the same shape."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> list[int]:
    """Timesteps kept when respacing (ADM semantics), sorted ascending.

    `section_counts` is an int / digit string ("250": 250 evenly strided steps), a comma list ("10,15,20":
    the range is cut into equal sections with that many steps each), or "ddimN" (stride T//N from 0).
    Within a section of `size` steps, k steps take indices round(i * (size - 1) / (k - 1)); the stride is
    accumulated in floating point as ADM does, so the rounding matches its step sets exactly.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            wanted = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == wanted:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {wanted} steps with an integer stride over {num_timesteps}")
        section_counts = [int(c) for c in section_counts.split(",")]
    elif isinstance(section_counts, int):
        section_counts = [section_counts]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"cannot take {count} steps from a section of {size} timesteps (valid: 1..{size})")
        stride = (size - 1) / (count - 1) if count > 1 else 1.0
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(kept)


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of Phi used by ADM/DiT (kept so loss values match theirs)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of data in [-1, 1] quantised to 256 bins under N(means, e^(2 log_scales)), in nats.

    The outermost bins extend to -inf / +inf, so the decoder assigns all mass to valid 8-bit values.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch (DiT's per-sample reduction over C, H, W)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


class GaussianDiffusion:
    """Forward process, posterior, learned-range variance, hybrid loss and ancestral sampling.

    `timestep_map[i]` is the original timestep of internal step i (identity unless respaced); models are
    always called with the original index so a model trained on 1000 steps samples with any respacing.
    """

    def __init__(self, betas: torch.Tensor, timestep_map: Sequence[int] | None = None, learn_sigma: bool = True):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a 1-D tensor with values in (0, 1]")
        self.num_timesteps = len(betas)
        self.learn_sigma = learn_sigma
        self.timestep_map = torch.as_tensor(
            list(range(self.num_timesteps)) if timestep_map is None else list(timestep_map), dtype=torch.long
        )
        if len(self.timestep_map) != self.num_timesteps:
            raise ValueError("timestep_map must have one entry per beta")

        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()
        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, posterior_variance)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The variance is 0 at t=0; its log is clipped to the t=1 value (used as the learned range's lower end).
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
            if self.num_timesteps > 1
            else self.posterior_variance
        )
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)

    @staticmethod
    def _gather(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] in like's dtype/device, shaped (N, 1, 1, ...) to broadcast over like."""
        values = table.to(t.device)[t].to(like.dtype)
        return values.reshape(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(acp_t) x_0 + sqrt(1 - acp_t) eps."""
        return (
            self._gather(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + self._gather(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (
            self._gather(self.posterior_mean_coef1, t, x_t) * x_start
            + self._gather(self.posterior_mean_coef2, t, x_t) * x_t
        )
        return mean, self._gather(self.posterior_variance, t, x_t), self._gather(self.posterior_log_variance_clipped, t, x_t)

    def predict_xstart(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return self._gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - self._gather(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps

    def p_mean_variance(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False):
        """Mean, log-variance and predicted x_0 of p(x_{t-1} | x_t) from a raw model output.

        With learned sigma the output holds [eps, v]; log var = frac*log(beta_t) + (1-frac)*log(posterior var),
        frac = (v + 1) / 2. Without it the variance is fixed to beta_t (with the posterior value at t=0).
        """
        channels = x_t.shape[1]
        if self.learn_sigma:
            if model_output.shape[1] != 2 * channels:
                raise ValueError(f"learn_sigma expects {2 * channels} output channels, got {model_output.shape[1]}")
            eps, v = model_output.split(channels, dim=1)
            min_log = self._gather(self.posterior_log_variance_clipped, t, x_t)
            max_log = self._gather(torch.log(self.betas), t, x_t)
            frac = (v + 1.0) / 2.0
            log_variance = frac * max_log + (1.0 - frac) * min_log
        else:
            if model_output.shape[1] != channels:
                raise ValueError(f"expected {channels} output channels, got {model_output.shape[1]}")
            eps = model_output
            fixed = torch.log(torch.cat([self.posterior_variance[1:2], self.betas[1:]]))
            log_variance = self._gather(fixed, t, x_t).expand_as(x_t)
        pred_xstart = self.predict_xstart(x_t, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior(pred_xstart, x_t, t)
        return mean, log_variance, pred_xstart

    def vb_terms_bpd(self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-sample VLB term in bits per dimension: KL to the true posterior, or the decoder NLL at t=0."""
        true_mean, _, true_log_variance = self.q_posterior(x_start, x_t, t)
        mean, log_variance, _ = self.p_mean_variance(model_output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, mean, log_variance)) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x_start, mean, 0.5 * log_variance)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(
        self, model: ModelFn, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Per-sample DiT hybrid loss: mse(eps) + vb, vb computed with eps detached (it trains only sigma)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        output = model(x_t, self.timestep_map.to(t.device)[t])
        channels = x_start.shape[1]
        eps = output[:, :channels]
        terms = {"mse": mean_flat((noise - eps) ** 2)}
        if self.learn_sigma:
            frozen = torch.cat([eps.detach(), output[:, channels:]], dim=1)
            terms["vb"] = self.vb_terms_bpd(frozen, x_start, x_t, t)
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms

    @torch.no_grad()
    def p_sample(self, model: ModelFn, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, clip_denoised: bool = False):
        """One ancestral step x_t -> x_{t-1} (no noise added at t=0). Returns (x_{t-1}, predicted x_0)."""
        output = model(x, self.timestep_map.to(t.device)[t])
        mean, log_variance, pred_xstart = self.p_mean_variance(output, x, t, clip_denoised)
        nonzero = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return mean + nonzero * torch.exp(0.5 * log_variance) * noise, pred_xstart

    @torch.no_grad()
    def p_sample_loop(
        self,
        model: ModelFn,
        shape: Sequence[int],
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        clip_denoised: bool = False,
        progress: bool = False,
    ) -> torch.Tensor:
        """DDPM ancestral sampling from pure noise over this diffusion's (possibly respaced) steps."""
        x = noise.to(device) if noise is not None else torch.randn(*shape, generator=generator, device=device)
        steps: Iterable[int] = range(self.num_timesteps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(list(steps), desc="sampling", leave=False)
        for i in steps:
            t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
            step_noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x, _ = self.p_sample(model, x, t, step_noise, clip_denoised)
        return x


def classifier_free_guidance(
    model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    y: torch.Tensor,
    scale: float,
    null_label: int,
    channels: int | str = 3,
) -> ModelFn:
    """Wrap a class-conditional model into a guided (x_t, t) -> output function.

    One forward over [x; x] with labels [y; null]; eps_g = eps_u + scale * (eps_c - eps_u) on the first
    `channels` output channels (3 as in DiT's forward_with_cfg, or "all" latent channels as diffusers does);
    the other channels (and the variance half) keep the conditional prediction.
    """
    labels = torch.cat([y, torch.full_like(y, null_label)])

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if scale == 1.0:
            return model(x, t, y)
        out_cond, out_uncond = model(torch.cat([x, x]), torch.cat([t, t]), labels).chunk(2)
        n = x.shape[1] if channels == "all" else int(channels)
        if not 1 <= n <= x.shape[1]:
            raise ValueError(f"cfg channels must be 'all' or 1..{x.shape[1]}, got {channels!r}")
        guided_eps = out_uncond[:, :n] + scale * (out_cond[:, :n] - out_uncond[:, :n])
        return torch.cat([guided_eps, out_cond[:, n:]], dim=1)

    return guided


def create_diffusion(
    timestep_respacing: str | int | Sequence[int] | None = None,
    num_timesteps: int = 1000,
    learn_sigma: bool = True,
) -> GaussianDiffusion:
    """DiT's create_diffusion: linear schedule, learned range variance, optionally respaced for sampling.

    Respacing keeps the cumulative alphas of the chosen steps: beta_k = 1 - acp[s_k] / acp[s_{k-1}].
    """
    betas = linear_betas(num_timesteps)
    if timestep_respacing in (None, "", num_timesteps, str(num_timesteps)):
        return GaussianDiffusion(betas, learn_sigma=learn_sigma)
    kept = space_timesteps(num_timesteps, timestep_respacing)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[kept][:-1]])
    new_betas = 1.0 - alphas_cumprod[kept] / previous
    return GaussianDiffusion(new_betas, timestep_map=kept, learn_sigma=learn_sigma)
