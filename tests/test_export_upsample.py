"""The VAE decoder's upsamplers in phase form: the same numbers as nearest-2x then 3x3 conv, on 4/9 of the work."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.upsampling import Upsample2D
from torch import nn

from exporter.upsample import PhaseUpsampleConv, phase_upsamplers


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("size", [(5, 7), (1, 1), (8, 8)])
def test_phases_equal_upsample_then_conv(bias, size):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 4, 3, padding=1, bias=bias).double()
    x = torch.randn(2, 6, *size, dtype=torch.float64)
    expected = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    got = PhaseUpsampleConv(conv)(x)
    assert got.shape == expected.shape == (2, 4, 2 * size[0], 2 * size[1])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("conv", [nn.Conv2d(4, 4, 3, padding=0), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1, stride=2),
                                  nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")])
def test_other_convolutions_are_refused(conv):
    with pytest.raises(ValueError, match="3x3, stride 1, padding 1"):
        PhaseUpsampleConv(conv)


def test_vae_decoder_upsamplers_are_replaced_in_a_copy():
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[8, 16, 16], norm_num_groups=4, latent_channels=4, layers_per_block=1,
                        down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3).eval()
    phased, replaced = phase_upsamplers(vae)
    assert replaced == 2  # every up block but the last upsamples
    assert sum(isinstance(m, Upsample2D) for m in vae.decoder.modules()) == 2  # the original is untouched
    latent = torch.randn(2, 4, 5, 6)
    with torch.no_grad():
        expected = vae.decode(latent).sample
        got = phased.decode(latent).sample
        upsampler = phased.decoder.up_blocks[0].upsamplers[0]
        hidden = torch.randn(1, 16, 3, 3)
        torch.testing.assert_close(upsampler(hidden, output_size=(6, 6)),  # explicit sizes keep the original path
                                   vae.decoder.up_blocks[0].upsamplers[0](hidden, output_size=(6, 6)))
    assert got.shape == expected.shape == (2, 3, 20, 24)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
