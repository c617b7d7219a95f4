"""DiT parity with the official formulas (closed forms and a functional reference block), CFG and input checks."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import create_model
from models.embeddings import sincos_pos_embed_2d, timestep_embedding


def perturbed(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Random non-zero weights everywhere: zero-init would make most comparisons trivial."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * std)
    return model


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 1.0, 17.0, 999.0])
    emb = timestep_embedding(t, 256)
    i = np.arange(128)
    freqs = np.exp(-math.log(10000) * i / 128)
    expected = np.concatenate([np.cos(np.outer(t.numpy(), freqs)), np.sin(np.outer(t.numpy(), freqs))], axis=1)
    np.testing.assert_allclose(emb.numpy(), expected, atol=2e-4)  # float32 args up to 999 rad
    assert emb[0, :128].eq(1).all() and emb[0, 128:].eq(0).all()  # cos first


def test_pos_embed_column_first_closed_form():
    table = sincos_pos_embed_2d(16, 4)  # D/4 = 4 frequencies
    omega = 1.0 / 10000 ** (np.arange(4) / 4)
    token = 2 * 4 + 3  # row 2, col 3
    expected = np.concatenate([np.sin(3 * omega), np.cos(3 * omega), np.sin(2 * omega), np.cos(2 * omega)])
    np.testing.assert_allclose(table[token], expected, rtol=0, atol=1e-12)
    model = create_model("dit_tiny_2", input_size=8)
    np.testing.assert_allclose(model.pos_embed[0].numpy(), sincos_pos_embed_2d(128, 4).astype(np.float32))
    assert not model.pos_embed.requires_grad


def test_zero_init_and_forward_backward():
    model = create_model("dit_tiny_2", input_size=8, num_classes=10)
    for block in model.blocks:
        assert block.adaLN_modulation[-1].weight.abs().sum() == 0
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 999]), torch.tensor([3, 10])
    out = model(x, t, y)
    assert out.shape == (2, 8, 8, 8) and out.abs().sum() == 0  # zero-initialised output layer
    perturbed(model)
    model(x, t, y).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def reference_block(block, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """DiT block written from the paper's formulas with explicit weights (spec 1.2)."""
    n, tokens, d = x.shape
    heads = block.attn.num_heads
    mod = F.silu(c) @ block.adaLN_modulation[1].weight.T + block.adaLN_modulation[1].bias
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (mod[:, k * d:(k + 1) * d, None].transpose(1, 2) for k in range(6))
    h = F.layer_norm(x, (d,), eps=1e-6) * (1 + scale_msa) + shift_msa
    qkv = h @ block.attn.qkv.weight.T + block.attn.qkv.bias
    q, k, v = (qkv[..., j * d:(j + 1) * d].reshape(n, tokens, heads, d // heads) for j in range(3))
    weights = torch.einsum("nthd,nshd->nhts", q, k).div(math.sqrt(d // heads)).softmax(-1)
    attn = torch.einsum("nhts,nshd->nthd", weights, v).reshape(n, tokens, d)
    x = x + gate_msa * (attn @ block.attn.proj.weight.T + block.attn.proj.bias)
    h = F.layer_norm(x, (d,), eps=1e-6) * (1 + scale_mlp) + shift_mlp
    u = h @ block.mlp.fc1.weight.T + block.mlp.fc1.bias
    u = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))
    return x + gate_mlp * (u @ block.mlp.fc2.weight.T + block.mlp.fc2.bias)


def test_block_matches_reference_formulas():
    model = perturbed(create_model("dit_tiny_2", input_size=8), std=0.1)
    block = model.blocks[0]
    x, c = torch.randn(2, 16, 128), torch.randn(2, 128)
    torch.testing.assert_close(block(x, c, 4, 4), reference_block(block, x, c), rtol=1e-5, atol=1e-5)


def test_full_forward_matches_reference_pipeline():
    model = perturbed(create_model("dit_tiny_2", input_size=8, num_classes=10), std=0.1).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 700]), torch.tensor([2, 10])
    p, g = 2, 4
    patches = x.reshape(2, 4, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(2, g * g, 4 * p * p)  # (c, pr, pc)
    h = patches @ model.x_embedder.proj.weight.reshape(128, -1).T + model.x_embedder.proj.bias + model.pos_embed
    te = timestep_embedding(t, 256)
    c = F.silu(te @ model.t_embedder.mlp[0].weight.T + model.t_embedder.mlp[0].bias)
    c = c @ model.t_embedder.mlp[2].weight.T + model.t_embedder.mlp[2].bias
    c = c + model.y_embedder.embedding_table.weight[y]
    for block in model.blocks:
        h = reference_block(block, h, c)
    mod = F.silu(c) @ model.final_layer.adaLN_modulation[1].weight.T + model.final_layer.adaLN_modulation[1].bias
    shift, scale = mod[:, None, :128], mod[:, None, 128:]
    h = F.layer_norm(h, (128,), eps=1e-6) * (1 + scale) + shift
    tokens = h @ model.final_layer.linear.weight.T + model.final_layer.linear.bias  # (n, T, p*p*8)
    expected = torch.empty(2, 8, 8, 8)
    for r in range(g):
        for col in range(g):
            for pr in range(p):
                for pc in range(p):
                    for ch in range(8):  # unpatchify: vector index (pr * p + pc) * C_out + ch
                        expected[:, ch, r * p + pr, col * p + pc] = tokens[:, r * g + col, (pr * p + pc) * 8 + ch]
    torch.testing.assert_close(model(x, t, y), expected, rtol=1e-4, atol=1e-5)


def test_float_and_int_timesteps_agree():
    model = perturbed(create_model("dit_tiny_2", input_size=8)).eval()
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([0, 1])
    torch.testing.assert_close(model(x, torch.tensor([3, 250]), y), model(x, torch.tensor([3.0, 250.0]), y))


def test_label_dropout_only_in_training():
    model = create_model("dit_tiny_2", input_size=8, class_dropout_prob=1.0)
    labels = torch.tensor([1, 2, 3])
    null = model.y_embedder.embedding_table.weight[1000]
    torch.testing.assert_close(model.y_embedder(labels), null.expand(3, -1))
    model.eval()
    torch.testing.assert_close(model.y_embedder(labels), model.y_embedder.embedding_table.weight[labels])


@pytest.mark.parametrize("channels", [3, "all"])
def test_forward_with_cfg(channels):
    model = perturbed(create_model("dit_tiny_2", input_size=8, num_classes=10)).eval()
    z = torch.randn(2, 4, 8, 8)
    x, t, y = torch.cat([z, torch.randn_like(z)]), torch.tensor([10, 20, 10, 20]), torch.tensor([1, 2, 10, 10])
    out = model.forward_with_cfg(x, t, y, cfg_scale=4.0, cfg_channels=channels)
    raw = model(torch.cat([z, z]), t, y)
    g = 3 if channels == 3 else 4
    guided = raw[2:, :g] + 4.0 * (raw[:2, :g] - raw[2:, :g])
    torch.testing.assert_close(out[:2, :g], guided)
    torch.testing.assert_close(out[2:, :g], guided)
    torch.testing.assert_close(out[:, g:], raw[:, g:])  # unguided channels keep each half's values


def test_bad_inputs_have_clear_errors():
    with pytest.raises(ValueError, match="dit_xl_2"):
        create_model("dit_xxl_2")
    with pytest.raises(TypeError, match="hidden_sise"):
        create_model("dit_tiny_2", hidden_sise=64)
    with pytest.raises(ValueError, match="divisible by the patch size"):
        create_model("dit_tiny_2", input_size=9)
    model = create_model("dit_tiny_2", input_size=8, num_classes=10)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([1])
    with pytest.raises(ValueError, match=r"\[0, 10\]"):
        model(x, t, torch.tensor([11]))
    with pytest.raises(ValueError, match=r"\[0, 10\]"):
        model(x, t, torch.tensor([-1]))
    with pytest.raises(ValueError, match="in_channels=4"):
        model(torch.randn(1, 3, 8, 8), t, torch.tensor([1]))
    with pytest.raises(ValueError, match="8x8"):
        model(torch.randn(1, 4, 16, 16), t, torch.tensor([1]))
    with pytest.raises(TypeError, match="integer"):
        model(x, t, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="cfg_channels"):
        model.forward_with_cfg(torch.randn(2, 4, 8, 8), torch.tensor([1, 1]), torch.tensor([1, 10]), 2.0, cfg_channels=5)


def test_aliases_and_overrides():
    assert create_model("DiT-XL/2", input_size=8, depth=1, hidden_size=32, num_heads=2).name == "dit_xl_2"
    model = create_model("dit_tiny_2", input_size=16, in_channels=1, num_classes=10, learn_sigma=False, depth=2)
    assert model.out_channels == 1 and model(torch.randn(1, 1, 16, 16), torch.tensor([1]), torch.tensor([3])).shape == (
        1, 1, 16, 16)
    rebuilt = create_model(model.name, **model.config)
    rebuilt.load_state_dict(model.state_dict())  # config.json round trip: kwargs rebuild the same layout
