"""CLEAR linearisation: full-attention equivalence at huge radius, disc semantics, pooled tokens, MAC counting."""
import math

import numpy as np
import pytest
import torch

from models import count_macs, create_model, linearize, reparameterize
from models.flops import attended_pairs
from models.linearize import LocalWindow
from tests.test_models_dit import perturbed

SMALL = {
    "dit_tiny_2": dict(input_size=16),
    "udit_tiny": dict(input_size=16),
    "udit_s_vanilla": dict(input_size=16, hidden_size=32, num_heads=2, depth=[1, 1, 1, 1, 1]),
    "dit_unet": dict(input_size=16, hidden_size=32, num_heads=2, depth=[1, 1, 1, 1, 1]),
}


def inputs(batch: int = 2):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, 4, 16, 16, generator=generator), torch.tensor([3, 800])[:batch], torch.tensor([5, 1000])[:batch]


@pytest.mark.parametrize("name", list(SMALL))
def test_huge_radius_is_full_attention(name):
    model = perturbed(create_model(name, **SMALL[name]), std=0.1).eval()
    local = linearize(model, radius=64)
    assert local.attention_config == {"kind": "local", "radius": 64, "down_factor": 0}
    assert model.attention_config == {"kind": "full"}
    x, t, y = inputs()
    reference = model(x, t, y)
    assert ((local(x, t, y) - reference).norm() / reference.norm()).item() < 1e-5
    assert all(getattr(m, "window", None) is None for m in model.modules())  # input untouched


def test_dit_window_is_a_clipped_disc():
    torch.manual_seed(0)
    model = perturbed(create_model("dit_tiny_2", input_size=16), std=0.2)
    attn = model.blocks[0].attn
    x = torch.randn(2, 64, 128)
    attn.window = LocalWindow(radius=3)
    n, tokens, d = x.shape
    q, k, v = (attn.qkv(x)[..., j * d:(j + 1) * d].reshape(n, tokens, 4, 32).transpose(1, 2) for j in range(3))
    yy, xx = torch.arange(8).repeat_interleave(8), torch.arange(8).repeat(8)
    inside = (yy[:, None] - yy[None]) ** 2 + (xx[:, None] - xx[None]) ** 2 < 9
    logits = (q @ k.transpose(-1, -2) / math.sqrt(32)).masked_fill(~inside, float("-inf"))
    expected = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(n, tokens, d))
    torch.testing.assert_close(attn(x, 8, 8), expected, rtol=1e-4, atol=1e-5)


def test_pooled_tokens_are_learnable_and_round_trip():
    model = perturbed(create_model("udit_tiny", input_size=16))
    local = linearize(model, radius=2, down_factor=2)
    assert local.attention_config == {"kind": "local", "radius": 2, "down_factor": 2}
    pools = {k: v for k, v in local.state_dict().items() if k.endswith("window.pool_weight")}
    assert len(pools) == 2 * 6 and all(torch.equal(v, torch.full((4,), 0.25)) for v in pools.values())
    x, t, y = inputs()
    out = local(x, t, y)
    assert torch.isfinite(out).all() and not torch.allclose(out, model.eval()(x, t, y))
    fused = reparameterize(local)  # exporter order: linearize (train/distill), then fuse
    assert fused.attention_config == local.attention_config
    assert ((fused(x, t, y) - local.eval()(x, t, y)).norm() / out.norm()).item() < 1e-4
    local.train()(x, t, y).square().mean().backward()
    assert local.encoder_level_1[0].attn1.window.pool_weight.grad.abs().sum() > 0
    # what train/exporter do with config.json: rebuild, linearize with the recorded settings, load strict
    rebuilt = linearize(create_model(model.name, **model.config), **{
        k: local.attention_config[k] for k in ("radius", "down_factor")})
    rebuilt.load_state_dict(local.state_dict(), strict=True)


def test_linearize_errors():
    model = create_model("dit_tiny_2", input_size=16)
    with pytest.raises(ValueError, match="radius"):
        linearize(model, radius=0)
    with pytest.raises(ValueError, match="down_factor=3"):
        linearize(model, radius=4, down_factor=3)
    with pytest.raises(ValueError, match="already"):
        linearize(linearize(model, radius=4), radius=2)
    with pytest.raises(ValueError, match="down_factor=4"):
        linearize(create_model("udit_tiny", input_size=16), radius=2, down_factor=4)  # middle groups are 2x2


@pytest.mark.parametrize("grid_h,grid_w,radius", [(8, 8, 3), (5, 11, 4), (16, 16, 8), (3, 3, 50)])
def test_attended_pairs_brute_force(grid_h, grid_w, radius):
    yy, xx = np.divmod(np.arange(grid_h * grid_w), grid_w)
    brute = int(((yy[:, None] - yy[None]) ** 2 + (xx[:, None] - xx[None]) ** 2 < radius**2).sum())
    assert attended_pairs(grid_h, grid_w, LocalWindow(radius)) == brute
    assert attended_pairs(grid_h, grid_w, LocalWindow(radius, down_factor=1)) == brute + (grid_h * grid_w) ** 2


def test_local_macs_replace_the_attention_matmuls():
    with torch.device("meta"):
        model = create_model("dit_tiny_2")  # 4 blocks, hidden 128, 16 x 16 tokens
    local = linearize(model, radius=8)
    full_pairs, local_pairs = 256**2, attended_pairs(16, 16, LocalWindow(8))
    assert count_macs(local) == count_macs(model) - 4 * 2 * 128 * (full_pairs - local_pairs)
