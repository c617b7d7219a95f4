"""U-DiT parity: attention against a dense reference written from udit_models.py's formulas, re-parameterisation."""
import math

import pytest
import torch
import torch.nn.functional as F

from models import create_model, reparameterize
from models.linearize import LocalWindow
from models.udit import DownsampledAttention
from tests.test_models_dit import perturbed


def reference_rope(x: torch.Tensor, grid_w: int) -> torch.Tensor:
    """udit_models.py RoPE2D with complex numbers: pair 2i by col * f_i, pair 2i+1 by row * f_i."""
    m, d = x.shape[-2:]
    pos = torch.arange(m)
    freqs = 1.0 / 10000 ** (torch.arange(0, d, 4)[: d // 4].float() / d)
    col, row = torch.outer((pos % grid_w).float(), freqs), torch.outer((pos // grid_w).float(), freqs)
    angles = torch.stack([col, row], dim=-1).reshape(m, d // 2)
    rotated = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * torch.polar(torch.ones_like(angles), angles)
    return torch.view_as_real(rotated).flatten(-2)


def reference_attention(attn: DownsampledAttention, x: torch.Tensor, radius: int | None = None) -> torch.Tensor:
    """Dense, one group at a time: dwconv5 + x, groups x[..., i::2, j::2], shared qkv, RoPE, logits, merge."""
    b, c, h, w = x.shape
    heads, hd = attn.num_heads, c // attn.num_heads
    x = F.conv2d(x, attn.downsampler.layer.weight, attn.downsampler.layer.bias, padding=2, groups=c) + (
        x if attn.downsampler.shortcut else 0)
    merged = torch.zeros_like(x)
    for i in (0, 1):
        for j in (0, 1):
            group = x[:, :, i::2, j::2]
            gh, gw = group.shape[-2:]
            qkv = group.flatten(2).transpose(1, 2) @ attn.to_qkv.weight.T + attn.to_qkv.bias
            q, k, v = (qkv[..., s * c:(s + 1) * c].reshape(b, gh * gw, heads, hd).transpose(1, 2) for s in range(3))
            if attn.rope:
                q, k = reference_rope(q, gw), reference_rope(k, gw)
            if attn.cosine:
                logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)
                logits = logits * attn.logit_scale.clamp(max=math.log(100)).exp()
            else:
                logits = q @ k.transpose(-1, -2) / math.sqrt(hd)
            if radius is not None:
                yy, xx = torch.arange(gh).repeat_interleave(gw), torch.arange(gw).repeat(gh)
                inside = (yy[:, None] - yy[None]) ** 2 + (xx[:, None] - xx[None]) ** 2 < radius**2
                logits = logits.masked_fill(~inside, float("-inf"))
            out = logits.softmax(-1) @ v  # (b, heads, M, hd)
            merged[:, :, i::2, j::2] = out.transpose(2, 3).reshape(b, c, gh, gw)
    return F.conv2d(merged, attn.to_out.weight, attn.to_out.bias)


@pytest.mark.parametrize("name", ["udit_tiny", "udit_s_vanilla"])
def test_downsampled_attention_matches_reference(name):
    model = create_model(name, hidden_size=32, num_heads=2, depth=[1, 1, 1, 1, 1])
    attn = perturbed(model.encoder_level_1[0].attn1, std=0.2)
    with torch.no_grad():
        if attn.cosine:
            attn.logit_scale.copy_(torch.tensor([1.0, 4.9]).view(2, 1, 1))  # one head beyond the ln 100 clamp
    # float64: with a logit scale of 100 float32 rounding alone moves single outputs past atol 1e-5
    attn = attn.double()
    x = torch.randn(2, 32, 8, 12, dtype=torch.float64)  # non-square grid, NCHW as upstream; the module takes NHWC
    channels_last = x.permute(0, 2, 3, 1)
    expected = reference_attention(attn, x).permute(0, 2, 3, 1)
    torch.testing.assert_close(attn(channels_last), expected, rtol=1e-4, atol=1e-5)
    attn.window = LocalWindow(radius=2)
    expected = reference_attention(attn, x, radius=2).permute(0, 2, 3, 1)
    torch.testing.assert_close(attn(channels_last), expected, rtol=1e-4, atol=1e-5)


def test_udit_forward_backward_and_zero_init():
    model = create_model("udit_tiny", input_size=16, num_classes=10)
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([0, 999]), torch.tensor([9, 10])
    assert model(x, t, y).abs().sum() == 0  # adaLN-Zero + zero output conv
    assert torch.allclose(model.encoder_level_1[0].attn1.logit_scale, torch.tensor(math.log(10.0)))
    perturbed(model)
    out = model(x, t, y)
    assert out.shape == (2, 8, 16, 16)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_reparameterize_matches_and_never_mutates():
    model = perturbed(create_model("udit_tiny", input_size=16), std=0.1)
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([7, 600]), torch.tensor([3, 1000])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    train_before = model(x, t, y)
    model.eval()
    eval_before = model(x, t, y)
    model.train()

    fused = reparameterize(model)
    assert model.training and not fused.training
    assert model.config["reparameterized"] is False and fused.config["reparameterized"] is True
    state = model.state_dict()
    assert all(torch.equal(state[k], before[k]) for k in before) and state.keys() == before.keys()
    torch.manual_seed(1)
    torch.testing.assert_close(model(x, t, y), train_before, rtol=0, atol=0)
    model.eval()
    torch.testing.assert_close(model(x, t, y), eval_before, rtol=0, atol=0)
    assert not any(p.data_ptr() == q.data_ptr() for p in model.parameters() for q in fused.parameters())

    out = fused(x, t, y)
    assert ((out - eval_before).norm() / eval_before.norm()).item() < 1e-4
    assert fused.encoder_level_1[0].attn1.downsampler.shortcut is False

    # the fused layout is a constructor flag, so a fused checkpoint loads into create_model(name, **config)
    rebuilt = create_model(fused.name, **fused.config).eval()
    rebuilt.load_state_dict(fused.state_dict(), strict=True)
    torch.testing.assert_close(rebuilt(x, t, y), out)
    assert len(reparameterize(fused).state_dict()) == len(fused.state_dict())


def test_vanilla_and_dit_unet_reparameterize_folds_only_the_shortcut():
    for name in ("udit_s_vanilla", "dit_unet"):
        model = perturbed(create_model(name, hidden_size=32, num_heads=2, depth=[1, 1, 1, 1, 1], input_size=16))
        x, t, y = torch.randn(1, 4, 16, 16), torch.tensor([5]), torch.tensor([1])
        model.eval()
        torch.testing.assert_close(reparameterize(model)(x, t, y), model(x, t, y), rtol=1e-5, atol=1e-5)


def test_udit_bad_inputs():
    with pytest.raises(ValueError, match="divisible by 8"):
        create_model("udit_tiny", input_size=20)
    with pytest.raises(ValueError, match="head_dim"):
        create_model("udit_tiny", hidden_size=30, num_heads=3)
    with pytest.raises(ValueError, match="ffn"):
        create_model("udit_tiny", ffn="moe")
    model = create_model("udit_tiny", input_size=16)
    t, y = torch.tensor([1]), torch.tensor([1])
    with pytest.raises(ValueError, match="divisible by 8"):
        model(torch.randn(1, 4, 12, 16), t, y)
    with pytest.raises(ValueError, match="in_channels=4"):
        model(torch.randn(1, 8, 16, 16), t, y)
    with pytest.raises(ValueError, match=r"\[0, 1000\]"):
        model(torch.randn(1, 4, 16, 16), t, torch.tensor([1001]))


def test_udit_runs_other_latent_sizes():
    model = perturbed(create_model("udit_tiny", input_size=16)).eval()
    assert model(torch.randn(1, 4, 24, 16), torch.tensor([3]), torch.tensor([2])).shape == (1, 8, 24, 16)
