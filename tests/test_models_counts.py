"""Parameter totals, MACs and state_dict layouts against the published tables (meta device: nothing allocates)."""
from functools import lru_cache

import pytest
import torch

from models import MODEL_NAMES, count_macs, count_params, create_model, reparameterize

# (total params incl. the frozen pos_embed, paper GFLOPs = GMACs): DiT paper Table 4 / official models.py
DIT_TABLE = {
    "dit_s_8": (33_148_160, 0.36), "dit_s_4": (32_945_024, 1.41), "dit_s_2": (32_963_360, 6.06),
    "dit_b_8": (130_881_536, 1.42), "dit_b_4": (130_475_648, 5.56), "dit_b_2": (130_512_416, 23.01),
    "dit_l_8": (458_594_816, 5.01), "dit_l_4": (458_053_760, 19.70), "dit_l_2": (458_102_816, 80.71),
    "dit_xl_8": (675_683_072, 7.39), "dit_xl_4": (675_074_432, 29.05), "dit_xl_2": (675_129_632, 118.64),
}
# (unfused params as trained, fused params in M as published, fused GFLOPs): U-DiT paper Tables 2/8
UDIT_TABLE = {
    "udit_s": (58_896_568, 52.05, 6.04), "udit_b": (231_251_304, 204.43, 22.22),
    "udit_l": (916_335_304, 810.19, 85.00),
}
VANILLA_GFLOPS = {"udit_s_vanilla": 5.91, "udit_b_vanilla": 21.96, "udit_l_vanilla": 84.48}  # U-DiT Table 10


@lru_cache(maxsize=None)
def meta_model(name: str, fused: bool = False) -> torch.nn.Module:
    with torch.device("meta"):
        model = create_model(name)
    return reparameterize(model) if fused else model


def assert_gmacs(name: str, macs: int, paper: float) -> None:
    # 0.5 % of the paper, or half a unit of its last printed digit (0.358 prints as 0.36)
    assert abs(macs / 1e9 - paper) <= max(0.005 * paper, 0.005), f"{name}: {macs / 1e9:.3f} GMACs vs paper {paper}"


def test_names_cover_the_contract():
    required = [f"dit_{s}_{p}" for s in ("s", "b", "l", "xl") for p in (2, 4, 8)]
    required += ["udit_s", "udit_b", "udit_l", "udit_s_vanilla", "udit_b_vanilla", "udit_l_vanilla", "dit_unet"]
    required += ["dit_tiny_2", "udit_tiny"]
    assert isinstance(MODEL_NAMES, tuple) and set(required) <= set(MODEL_NAMES)


@pytest.mark.parametrize("name", list(DIT_TABLE))
def test_dit_params_and_macs(name):
    params, gflops = DIT_TABLE[name]
    model = meta_model(name)
    assert count_params(model) == params
    assert_gmacs(name, count_macs(model), gflops)


@pytest.mark.parametrize("name", list(UDIT_TABLE))
def test_udit_params_and_fused_macs(name):
    unfused, fused_m, gflops = UDIT_TABLE[name]
    assert count_params(meta_model(name)) == unfused
    fused = meta_model(name, fused=True)
    assert round(count_params(fused) / 1e6, 2) == fused_m
    assert_gmacs(name, count_macs(fused), gflops)


@pytest.mark.parametrize("name", list(VANILLA_GFLOPS))
def test_vanilla_udit_macs(name):
    assert_gmacs(name, count_macs(meta_model(name)), VANILLA_GFLOPS[name])


def test_dit_unet_matches_the_paper_budget():
    # U-DiT paper Table 1: DiT-UNet 1.40 GFLOPs (config unpublished; ours is documented in models.registry)
    assert abs(count_macs(meta_model("dit_unet")) / 1e9 - 1.40) < 0.02


def test_dit_state_dict_keys_and_shapes():
    for name, count in (("dit_s_2", 132), ("dit_b_2", 132), ("dit_l_2", 252), ("dit_xl_2", 292)):
        assert len(meta_model(name).state_dict()) == count
    shapes = {k: tuple(v.shape) for k, v in meta_model("dit_xl_2").state_dict().items()}
    assert shapes["pos_embed"] == (1, 256, 1152)
    assert shapes["x_embedder.proj.weight"] == (1152, 4, 2, 2)
    assert shapes["t_embedder.mlp.0.weight"] == (1152, 256)
    assert shapes["t_embedder.mlp.2.weight"] == (1152, 1152)
    assert shapes["y_embedder.embedding_table.weight"] == (1001, 1152)
    assert shapes["blocks.27.attn.qkv.weight"] == (3456, 1152)
    assert shapes["blocks.27.attn.proj.weight"] == (1152, 1152)
    assert shapes["blocks.0.mlp.fc1.weight"] == (4608, 1152)
    assert shapes["blocks.0.mlp.fc2.weight"] == (1152, 4608)
    assert shapes["blocks.0.adaLN_modulation.1.weight"] == (6912, 1152)
    assert shapes["final_layer.linear.weight"] == (32, 1152)
    assert shapes["final_layer.adaLN_modulation.1.weight"] == (2304, 1152)


def test_udit_state_dict_keys_and_shapes():
    state = meta_model("udit_s").state_dict()
    assert len(state) == 1043 and len(meta_model("udit_l").state_dict()) == 1043
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    expected = {
        "x_embedder.proj.weight": (96, 4, 3, 3), "x_embedder.proj.bias": (96,),
        "t_embedder_1.mlp.0.weight": (96, 256), "t_embedder_2.mlp.2.weight": (192, 192),
        "t_embedder_3.mlp.0.weight": (384, 256), "y_embedder_3.embedding_table.weight": (1001, 384),
        "down1_2.body.0.weight": (48, 96, 3, 3), "down2_3.body.0.weight": (96, 192, 3, 3),
        "up3_2.body.0.weight": (768, 384, 3, 3), "reduce_chan_level2.weight": (192, 384, 1, 1),
        "up2_1.body.0.weight": (384, 192, 3, 3), "reduce_chan_level1.weight": (192, 192, 1, 1),
        "output.weight": (192, 192, 3, 3), "final_layer.out_proj.weight": (8, 192, 3, 3),
        "final_layer.adaLN_modulation.1.weight": (384, 192),
        "encoder_level_1.0.attn1.logit_scale": (4, 1, 1),
        "encoder_level_1.0.attn1.to_qkv.weight": (288, 96), "encoder_level_1.0.attn2.to_out.weight": (96, 96, 1, 1),
        "encoder_level_1.1.attn2.downsampler.layer.weight": (96, 1, 5, 5),
        "latent.7.mlp1.project_in.0.weight": (384, 384, 1, 1), "latent.7.mlp1.project_in.1.weight": (768, 384, 1, 1),
        "latent.7.mlp2.dwconv.0.weight": (768, 1, 5, 5), "latent.7.mlp2.dwconv.1.weight": (768, 1, 3, 3),
        "latent.7.mlp2.dwconv.2.weight": (768, 1, 1, 1), "latent.7.mlp2.dwconv.2.bias": (768,),
        "decoder_level_1.1.mlp2.project_out.0.weight": (192, 384, 1, 1),
        "decoder_level_1.1.mlp2.project_out.1.weight": (192, 192, 1, 1),
        "decoder_level_2.4.adaLN_modulation2.1.weight": (1152, 192),
    }
    assert {k: shapes[k] for k in expected} == expected
    assert not any(k.startswith("encoder_level_1.2.") or "down1_2.body.0.bias" in k for k in shapes)


def test_fused_udit_layout():
    state = meta_model("udit_s", fused=True).state_dict()
    assert tuple(state["latent.0.mlp1.project_in.weight"].shape) == (768, 384, 1, 1)
    assert tuple(state["latent.0.mlp1.dwconv.weight"].shape) == (768, 1, 5, 5)
    assert tuple(state["latent.0.mlp1.project_out.weight"].shape) == (384, 768, 1, 1)
    assert not any(".dwconv.1." in k or ".project_in.0." in k for k in state)
