"""U-DiT (Tian et al., NeurIPS 2024) exactly as YuchuanTian/U-DiT udit_models.py: math, init, state_dict keys.

A U-Net of adaLN-Zero transformer blocks on the latent feature map (no patchify): encoder at C, 2C,
middle at 4C, decoder at 2C and, Restormer-style, 2C again at full resolution. Attention runs on
downsampled tokens: dwconv5 (+ identity) then 4 interleaved half-resolution groups with shared weights,
RoPE2D on the group grid and cosine logits (the `dit_ops::downsampled_attention` op).

Layout: the blocks keep the map channels-last, (B, H, W, C), so every norm, modulation and 1x1 map works on
the last axis (one matrix product, no permutes); only the k x k convolutions see NCHW, through one permute
in and one out. The parameters stay nn.Conv2d, so state_dict keys and shapes are upstream's.

Switches cover the paper's variants: `ffn` "rep" (re-parameterisable multi-branch FFN) or "basic"
(tanh-GELU MLP), `cosine`/`rope` (off = the Table 10 "vanilla" attention), `attention="full"` (plain
DiT self-attention, the DiT-UNet toy baseline) and `reparameterized` (the fused inference layout that
`models.reparameterize` produces).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from dit_ops.downsampled_attention.reference import downsampled_attention, merge_groups, rope2d, split_groups
from dit_ops.downsampled_attention.schema import MAX_LOGIT_SCALE

from .dit import Denoiser, qkv_heads
from .embeddings import LabelEmbedder, TimestepEmbedder, modulate


def to_nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


def to_nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


class PointwiseConv(nn.Conv2d):
    """Upstream's 1x1 Conv2d, applied to a channels-last map as the matrix product it is."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.flatten(1), self.bias)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels (last axis) at every pixel, eps 1e-6, no affine parameters."""

    def __init__(self, num_channels: int):
        super().__init__()
        self.num_channels = num_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.num_channels,), eps=1e-6)


class DownSampler(nn.Module):
    """Depthwise 5x5 conv plus identity shortcut before token grouping; `shortcut=False` once folded."""

    def __init__(self, dim: int, shortcut: bool = True):
        super().__init__()
        self.shortcut = shortcut
        self.layer = nn.Conv2d(dim, dim, kernel_size=5, padding=2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = to_nhwc(self.layer(to_nchw(x)))
        return out + x if self.shortcut else out


class DownsampledAttention(nn.Module):
    """Token-downsampled self-attention; the 4 groups never mix (cost N^2/4 instead of N^2).

    `window` is None or a CLEAR local window (attached by `models.linearize`) that restricts each group's
    attention to a disc on the half-resolution grid, keeping grouping, RoPE and the cosine logits.
    """

    def __init__(self, dim: int, num_heads: int, cosine: bool = True, rope: bool = True, shortcut: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.cosine = cosine
        self.rope = rope
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.to_out = PointwiseConv(dim, dim)
        if cosine:
            self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        self.downsampler = DownSampler(dim, shortcut)
        self.window: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsampler(x)
        b, h, w, dim = x.shape
        q, k, v = qkv_heads(self.to_qkv, x.reshape(b, h * w, dim), self.num_heads)
        # the op takes a (heads,) log-temperature in every mode; plain attention ignores it
        logit_scale = self.logit_scale.view(self.num_heads) if self.cosine else q.new_zeros(self.num_heads)
        if self.window is None:
            out = downsampled_attention(q, k, v, logit_scale, grid_h=h, grid_w=w, rope=self.rope, cosine=self.cosine)
        else:
            out = self.local_attention(q, k, v, logit_scale, h, w)
        return self.to_out(out.transpose(1, 2).reshape(b, h, w, dim))

    def local_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, logit_scale: torch.Tensor, h: int, w: int
    ) -> torch.Tensor:
        """Groups batched into the batch dim, RoPE + cosine as in the dense op, disc on the (h/2, w/2) grid."""
        b, heads, n, d = q.shape
        q, k, v = (split_groups(t, h, w) for t in (q, k, v))  # (B, heads, 4, N/4, D)
        if self.rope:
            q, k = rope2d(q, h // 2, w // 2), rope2d(k, h // 2, w // 2)
        if self.cosine:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
            scale = torch.clamp(logit_scale, max=MAX_LOGIT_SCALE).exp().to(q.dtype)
        else:
            scale = torch.full((heads,), d**-0.5, dtype=q.dtype, device=q.device)
        q, k, v = (t.transpose(1, 2).reshape(4 * b, heads, n // 4, d) for t in (q, k, v))
        out = self.window(q, k, v, scale, h // 2, w // 2)
        return merge_groups(out.view(b, 4, heads, n // 4, d).transpose(1, 2), h, w)


class FullAttention(nn.Module):
    """Plain DiT self-attention over all pixels of a stage (the DiT-UNet baseline), U-DiT key names."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.to_out = PointwiseConv(dim, dim)
        self.window: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, dim = x.shape
        q, k, v = qkv_heads(self.to_qkv, x.reshape(b, h * w, dim), self.num_heads)
        if self.window is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            scale = torch.full((self.num_heads,), self.head_dim**-0.5, dtype=q.dtype, device=q.device)
            out = self.window(q, k, v, scale, h, w)
        return self.to_out(out.transpose(1, 2).reshape(b, h, w, dim))


class RepFeedForward(nn.Module):
    """Training form of the re-parameterisable FFN: two 1x1 maps in, exact GELU,
    identity + depthwise 5x5 + 3x3 + 1x1 branches, two 1x1 maps out (no activation inside the pairs)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.project_in = nn.Sequential(PointwiseConv(dim, hidden // 2), PointwiseConv(hidden // 2, hidden))
        self.dwconv = nn.ModuleList(
            [nn.Conv2d(hidden, hidden, k, padding=k // 2, groups=hidden) for k in (5, 3, 1)]
        )
        self.project_out = nn.Sequential(PointwiseConv(hidden, hidden // 2), PointwiseConv(hidden // 2, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = to_nchw(F.gelu(self.project_in(x)))
        out = x
        for conv in self.dwconv:
            out = out + conv(x)
        return self.project_out(to_nhwc(out))


class FusedFeedForward(nn.Module):
    """Inference form of `RepFeedForward`: 1x1, exact GELU, one depthwise 5x5, 1x1."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.project_in = PointwiseConv(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 5, padding=2, groups=hidden)
        self.project_out = PointwiseConv(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project_out(to_nhwc(self.dwconv(to_nchw(F.gelu(self.project_in(x))))))


class BasicFeedForward(nn.Module):
    """'basic' FFN of the vanilla ablation: 1x1, tanh-GELU, 1x1."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = PointwiseConv(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = PointwiseConv(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class U_DiTBlock(nn.Module):
    """Two consecutive adaLN-Zero sub-layers (attention + FFN each) with separate weights."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, options: dict):
        super().__init__()
        for s in (1, 2):
            setattr(self, f"norm1{s}", LayerNorm2d(dim))
            setattr(self, f"attn{s}", _make_attention(dim, num_heads, options))
            setattr(self, f"norm2{s}", LayerNorm2d(dim))
            setattr(self, f"mlp{s}", _make_ffn(dim, mlp_ratio, options))
            setattr(self, f"adaLN_modulation{s}", nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim)))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        for s in (1, 2):
            modulation = getattr(self, f"adaLN_modulation{s}")(c)[:, None, None, :]
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=-1)
            x = x + gate_msa * getattr(self, f"attn{s}")(modulate(getattr(self, f"norm1{s}")(x), shift_msa, scale_msa))
            x = x + gate_mlp * getattr(self, f"mlp{s}")(modulate(getattr(self, f"norm2{s}")(x), shift_mlp, scale_mlp))
        return x


def _make_attention(dim: int, num_heads: int, options: dict) -> nn.Module:
    if options["attention"] == "full":
        return FullAttention(dim, num_heads)
    return DownsampledAttention(
        dim, num_heads, cosine=options["cosine"], rope=options["rope"], shortcut=not options["reparameterized"]
    )


def _make_ffn(dim: int, mlp_ratio: float, options: dict) -> nn.Module:
    hidden = int(dim * mlp_ratio)
    if options["ffn"] == "basic":
        return BasicFeedForward(dim, hidden)
    return FusedFeedForward(dim, hidden) if options["reparameterized"] else RepFeedForward(dim, hidden)


class Downsample(nn.Module):
    """3x3 conv to half the channels, then PixelUnshuffle(2): (C, H, W) -> (2C, H/2, W/2)."""

    def __init__(self, dim: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(dim, dim // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_nhwc(self.body(to_nchw(x)))


class Upsample(nn.Module):
    """3x3 conv to twice the channels, then PixelShuffle(2): (C, H, W) -> (C/2, 2H, 2W)."""

    def __init__(self, dim: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(dim, dim * 2, 3, padding=1, bias=False), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_nhwc(self.body(to_nchw(x)))


class StemConv(nn.Module):
    """3x3 conv stem (key x_embedder.proj): NCHW latent in, channels-last map out."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_nhwc(self.proj(x))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) on the channels-last 2C map, then a 3x3 conv to the NCHW output channels."""

    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.norm_final = LayerNorm2d(dim)
        self.out_proj = nn.Conv2d(dim, out_channels, 3, padding=1)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None, None, :].chunk(2, dim=-1)
        return self.out_proj(to_nchw(modulate(self.norm_final(x), shift, scale)))


FFN_TYPES = ("rep", "basic")
ATTENTION_TYPES = ("downsampled", "full")


class UDiT(Denoiser):
    """U-shaped diffusion transformer with per-stage timestep/label embedders and concat-1x1 skip fusion."""

    family = "udit"

    def __init__(
        self,
        input_size: int = 32,
        in_channels: int = 4,
        hidden_size: int = 96,
        depth: tuple[int, ...] | list[int] = (2, 5, 8, 5, 2),
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        ffn: str = "rep",
        attention: str = "downsampled",
        cosine: bool = True,
        rope: bool = True,
        reparameterized: bool = False,
    ):
        super().__init__()
        if ffn not in FFN_TYPES:
            raise ValueError(f"unknown ffn {ffn!r}; valid choices: {', '.join(FFN_TYPES)}")
        if attention not in ATTENTION_TYPES:
            raise ValueError(f"unknown attention {attention!r}; valid choices: {', '.join(ATTENTION_TYPES)}")
        if len(depth) != 5:
            raise ValueError(f"depth must list 5 stages (enc-1, enc-2, middle, dec-2, dec-1), got {list(depth)}")
        if attention == "full" and (cosine or rope):
            raise ValueError("attention='full' (plain DiT attention) takes cosine=False and rope=False")
        self.size_multiple = 8 if attention == "downsampled" else 4
        if input_size % self.size_multiple:
            raise ValueError(self._size_error(input_size, input_size))
        if hidden_size % (2 * num_heads):
            raise ValueError(
                f"U-DiT needs hidden_size divisible by 2 * num_heads, got hidden_size={hidden_size}, "
                f"num_heads={num_heads}"
            )
        if rope and (hidden_size // num_heads) % 4:
            raise ValueError(
                f"RoPE2D needs head_dim = hidden_size / num_heads divisible by 4, got {hidden_size // num_heads}"
            )
        self.config = dict(
            input_size=input_size, in_channels=in_channels, hidden_size=hidden_size, depth=list(depth),
            num_heads=num_heads, mlp_ratio=mlp_ratio, class_dropout_prob=class_dropout_prob,
            num_classes=num_classes, learn_sigma=learn_sigma, ffn=ffn, attention=attention, cosine=cosine,
            rope=rope, reparameterized=reparameterized,
        )
        self.attention_config = {"kind": "full"}
        self.input_size = input_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_classes = num_classes
        options = dict(ffn=ffn, attention=attention, cosine=cosine, rope=rope, reparameterized=reparameterized)
        c = hidden_size

        def stage(width: int, count: int) -> nn.ModuleList:
            return nn.ModuleList([U_DiTBlock(width, num_heads, mlp_ratio, options) for _ in range(count)])

        self.x_embedder = StemConv(in_channels, c)
        for k, width in enumerate((c, 2 * c, 4 * c), start=1):
            setattr(self, f"t_embedder_{k}", TimestepEmbedder(width))
            setattr(self, f"y_embedder_{k}", LabelEmbedder(num_classes, width, class_dropout_prob))
        self.encoder_level_1 = stage(c, depth[0])
        self.down1_2 = Downsample(c)
        self.encoder_level_2 = stage(2 * c, depth[1])
        self.down2_3 = Downsample(2 * c)
        self.latent = stage(4 * c, depth[2])
        self.up3_2 = Upsample(4 * c)
        self.reduce_chan_level2 = PointwiseConv(4 * c, 2 * c)
        self.decoder_level_2 = stage(2 * c, depth[3])
        self.up2_1 = Upsample(2 * c)
        self.reduce_chan_level1 = PointwiseConv(2 * c, 2 * c)
        self.decoder_level_1 = stage(2 * c, depth[4])
        self.output = nn.Conv2d(2 * c, 2 * c, 3, padding=1)
        self.final_layer = FinalLayer(2 * c, self.out_channels)
        self.initialize_weights()

    def _size_error(self, h: int, w: int) -> str:
        reason = (
            "two 2x downsamplings x 2x2 token groups" if self.size_multiple == 8 else "two 2x downsamplings"
        )
        return f"U-DiT needs latent height and width divisible by {self.size_multiple} ({reason}), got {h}x{w}"

    def initialize_weights(self) -> None:
        """Upstream init: xavier for every Linear/Conv2d, zero biases, N(0, .02) embedders, zeroed adaLN/output."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for k in (1, 2, 3):
            nn.init.normal_(getattr(self, f"y_embedder_{k}").embedding_table.weight, std=0.02)
            t_embedder = getattr(self, f"t_embedder_{k}")
            nn.init.normal_(t_embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(t_embedder.mlp[2].weight, std=0.02)
        zeroed = [self.final_layer.adaLN_modulation[-1], self.final_layer.out_proj]
        for block in self.blocks():
            zeroed += [block.adaLN_modulation1[-1], block.adaLN_modulation2[-1]]
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def blocks(self) -> list[U_DiTBlock]:
        """All U_DiTBlocks, encoder to decoder."""
        stages = (self.encoder_level_1, self.encoder_level_2, self.latent, self.decoder_level_2, self.decoder_level_1)
        return [block for stage in stages for block in stage]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.check_inputs(x, t, y)
        if x.shape[-2] % self.size_multiple or x.shape[-1] % self.size_multiple:
            raise ValueError(self._size_error(x.shape[-2], x.shape[-1]))
        # Each stage has its own embedders; each label embedder draws its own dropout mask (as upstream).
        c1 = self.t_embedder_1(t) + self.y_embedder_1(y)
        c2 = self.t_embedder_2(t) + self.y_embedder_2(y)
        c3 = self.t_embedder_3(t) + self.y_embedder_3(y)

        enc1 = self.x_embedder(x)
        for block in self.encoder_level_1:
            enc1 = block(enc1, c1)
        enc2 = self.down1_2(enc1)
        for block in self.encoder_level_2:
            enc2 = block(enc2, c2)
        mid = self.down2_3(enc2)
        for block in self.latent:
            mid = block(mid, c3)
        dec2 = self.reduce_chan_level2(torch.cat([self.up3_2(mid), enc2], dim=-1))
        for block in self.decoder_level_2:
            dec2 = block(dec2, c2)
        dec1 = self.reduce_chan_level1(torch.cat([self.up2_1(dec2), enc1], dim=-1))
        for block in self.decoder_level_1:
            dec1 = block(dec1, c2)
        return self.final_layer(to_nhwc(self.output(to_nchw(dec1))), c2)
