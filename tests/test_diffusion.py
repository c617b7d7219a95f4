"""models.diffusion against closed forms, diffusers' DDPMScheduler, and a tiny overfit."""

import math

import pytest
import torch

from models.diffusion import (
    GaussianDiffusion,
    classifier_free_guidance,
    create_diffusion,
    discretized_gaussian_log_likelihood,
    linear_betas,
    normal_kl,
    space_timesteps,
)


def test_linear_schedule_matches_dit():
    d = create_diffusion()
    assert d.betas[0].item() == pytest.approx(1e-4) and d.betas[-1].item() == pytest.approx(0.02)
    assert d.betas.dtype == torch.float64
    assert d.alphas_cumprod[-1].item() == pytest.approx(4.0358e-05, rel=1e-4)
    # 1000/T scaling keeps the endpoints proportional for other lengths.
    assert linear_betas(500)[-1].item() == pytest.approx(0.04)


def test_space_timesteps_250():
    kept = space_timesteps(1000, "250")
    assert len(kept) == 250
    assert kept[:3] == [0, 4, 8] and kept[-5:] == [983, 987, 991, 995, 999]
    assert kept == [round(k * 999 / 249) for k in range(250)]
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(100, "10,20") == sorted(
        [round(i * 49 / 9) for i in range(10)] + [50 + round(i * 49 / 19) for i in range(20)]
    )
    with pytest.raises(ValueError, match="cannot take"):
        space_timesteps(10, "20")


def test_respaced_betas_keep_cumulative_alphas():
    full = create_diffusion()
    spaced = create_diffusion("250")
    kept = torch.tensor(space_timesteps(1000, "250"))
    assert spaced.num_timesteps == 250
    assert spaced.betas[0].item() == pytest.approx(1e-4)
    torch.testing.assert_close(spaced.alphas_cumprod, full.alphas_cumprod[kept], rtol=1e-12, atol=0)
    assert spaced.timestep_map.tolist() == kept.tolist()


def test_posterior_closed_forms():
    d = create_diffusion()
    t = torch.arange(1, 1000)
    acp, acp_prev, beta = d.alphas_cumprod[t], d.alphas_cumprod[t - 1], d.betas[t]
    torch.testing.assert_close(d.posterior_variance[t], beta * (1 - acp_prev) / (1 - acp))
    assert d.posterior_variance[0].item() == 0.0
    assert d.posterior_log_variance_clipped[0].item() == pytest.approx(math.log(d.posterior_variance[1].item()))
    # Marginalising the posterior over q(x_t | x_0) gives back q(x_{t-1} | x_0) = N(sqrt(acp_prev) x_0, 1 - acp_prev).
    c1, c2 = d.posterior_mean_coef1[t], d.posterior_mean_coef2[t]
    torch.testing.assert_close(c1 + c2 * acp.sqrt(), acp_prev.sqrt())
    torch.testing.assert_close(c2**2 * (1 - acp) + d.posterior_variance[t], 1 - acp_prev)


def test_q_sample_and_predict_xstart_invert():
    d = create_diffusion()
    x0 = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    eps = torch.randn_like(x0)
    t = torch.tensor([0, 10, 500, 999])
    xt = d.q_sample(x0, t, eps)
    torch.testing.assert_close(d.predict_xstart(xt, t, eps), x0)


def test_normal_kl():
    m, lv = torch.randn(10), torch.randn(10)
    assert normal_kl(m, lv, m, lv).abs().max().item() < 1e-7
    # KL(N(0,1) || N(1, e^2)) = 0.5 * (-1 + 2 + e^-2 + e^-2)
    expected = 0.5 * (-1 + 2 + math.exp(-2) + math.exp(-2))
    assert normal_kl(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1.0), torch.tensor(2.0)).item() == pytest.approx(expected)


def test_discretized_gaussian_sums_to_one():
    values = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in [(0.0, -3.0), (0.3, -1.0), (-0.9, -5.0), (2.0, 0.5)]:
        logp = discretized_gaussian_log_likelihood(values, torch.full_like(values, mean), torch.full_like(values, log_scale))
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=2e-3)


def _exact_model(d: GaussianDiffusion, x0: torch.Tensor, eps: torch.Tensor, v: float):
    return lambda xt, t: torch.cat([eps, torch.full_like(eps, v)], dim=1)


def test_hybrid_loss_is_zero_for_the_exact_model():
    """True eps and v = -1 (posterior variance) give mse = 0 and KL = 0 at every t > 0."""
    d = create_diffusion()
    x0 = torch.rand(6, 2, 4, 4) * 2 - 1
    eps = torch.randn_like(x0)
    t = torch.tensor([1, 2, 50, 300, 700, 999])
    terms = d.training_losses(_exact_model(d, x0, eps, -1.0), x0, t, eps)
    assert terms["mse"].abs().max().item() < 1e-10
    assert terms["vb"].abs().max().item() < 1e-4
    # v = +1 (variance beta_t) gives a positive KL where beta_t and the posterior variance differ (small t).
    assert (d.training_losses(_exact_model(d, x0[:3], eps[:3], 1.0), x0[:3], t[:3], eps[:3])["vb"] > 1e-4).all()


def test_vb_gradient_reaches_only_the_variance_half():
    d = create_diffusion()
    x0, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    out = torch.randn(3, 4, 4, 4, requires_grad=True)
    d.training_losses(lambda x, t: out, x0, torch.tensor([0, 5, 900]), eps)["vb"].sum().backward()
    assert out.grad[:, :2].abs().max().item() == 0.0 and out.grad[:, 2:].abs().max().item() > 0


def test_decoder_nll_used_at_t0():
    """Exact eps at t=0 puts N(x_0, posterior_var[1]) on x_0: NLL = -log2 P(|z| < (1/255) / sigma) per pixel."""
    d = create_diffusion()
    x0 = torch.randint(1, 255, (2, 1, 4, 4)).double() / 127.5 - 1  # interior bins only
    eps = torch.randn_like(x0)
    vb = d.training_losses(_exact_model(d, x0, eps, -1.0), x0, torch.zeros(2, dtype=torch.long), eps)["vb"]
    half_width = (1 / 255) / math.sqrt(d.posterior_variance[1].item())
    expected = -math.log2(math.erf(half_width / math.sqrt(2)))
    torch.testing.assert_close(vb, torch.full_like(vb, expected), rtol=2e-3, atol=0)


@pytest.mark.parametrize("respacing", [None, "250"])
def test_ancestral_step_matches_diffusers(respacing):
    """One learned-range DDPM step equals diffusers' DDPMScheduler (same timesteps, same noise)."""
    from diffusers import DDPMScheduler

    d = create_diffusion(respacing)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type="learned_range", clip_sample=False)
    if respacing:
        sched.set_timesteps(timesteps=d.timestep_map.flip(0).tolist())
    x = torch.randn(2, 4, 6, 6)
    out = torch.randn(2, 8, 6, 6).clamp(-1, 1)
    for i in [d.num_timesteps - 1, d.num_timesteps // 2, 1]:
        original_t = int(d.timestep_map[i])
        noise = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(i))
        ours, _ = d.p_sample(lambda xt, t: out, x, torch.full((2,), i), noise)
        theirs = sched.step(out, original_t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_cfg_guides_the_requested_channels():
    def model(x, t, y):  # eps depends on the label: label k -> k everywhere; variance half -> label too
        return y.float().reshape(-1, 1, 1, 1).expand(x.shape[0], 2 * x.shape[1], *x.shape[2:]).clone()

    y = torch.tensor([2, 5])
    x = torch.zeros(2, 4, 3, 3)
    t = torch.zeros(2, dtype=torch.long)
    out = classifier_free_guidance(model, y, scale=4.0, null_label=10, channels=3)(x, t)
    # guided = 10 + 4 * (y - 10) on channels 0..2, conditional value elsewhere
    assert out[:, :3].flatten(1).unique(dim=1).squeeze().tolist() == [10 + 4 * (2 - 10), 10 + 4 * (5 - 10)]
    assert out[:, 3:].flatten(1).unique(dim=1).squeeze().tolist() == [2, 5]
    out_all = classifier_free_guidance(model, y, scale=4.0, null_label=10, channels="all")(x, t)
    assert out_all[:, :4].flatten(1).unique(dim=1).squeeze().tolist() == [-22, -10]
    with pytest.raises(ValueError, match="cfg channels"):
        classifier_free_guidance(model, y, scale=2.0, null_label=10, channels=7)(x, t)


def test_sampling_recovers_a_point_mass():
    """With the exact eps of a point-mass data distribution, ancestral sampling converges to that point."""
    d = create_diffusion("50")
    target = torch.tensor([0.5, -0.25]).reshape(1, 2, 1, 1)

    def exact_eps(xt, t_original):
        acp = create_diffusion().alphas_cumprod[t_original].float().reshape(-1, 1, 1, 1)
        eps = (xt - acp.sqrt() * target) / (1 - acp).sqrt()
        return torch.cat([eps, -torch.ones_like(eps)], dim=1)

    x = d.p_sample_loop(exact_eps, (8, 2, 1, 1), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, target.expand(8, -1, -1, -1), atol=1e-3, rtol=0)


def test_tiny_dit_overfits_one_batch():
    """The hybrid loss trains a real (tiny) DiT: on one fixed batch, noise and timesteps it falls several-fold."""
    import models

    torch.manual_seed(0)
    model = models.create_model("dit_tiny_2", input_size=8, in_channels=2, num_classes=3, depth=2, hidden_size=64, num_heads=2)
    d = create_diffusion()
    x0 = torch.randn(8, 2, 8, 8)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    t = torch.tensor([0, 5, 50, 200, 400, 600, 800, 999])
    noise = torch.randn_like(x0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.eval()  # no label dropout: the batch stays identical
    losses = []
    for _ in range(80):
        terms = d.training_losses(lambda xt, tt: model(xt, tt, y), x0, t, noise)
        loss = terms["loss"].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses[::10]
    assert terms["vb"].min().item() >= -1e-6  # the VLB terms stay non-negative
