"""DiT (Peebles & Xie, 2023) exactly as facebookresearch/DiT models.py: same math, init and state_dict keys.

Also holds `Denoiser`, the input checks and classifier-free guidance shared by DiT and U-DiT.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .embeddings import LabelEmbedder, TimestepEmbedder, modulate, sincos_pos_embed_2d


def _is_tracing() -> bool:
    """True while torch.export / dynamo / ONNX export trace the model: data-dependent checks must be skipped."""
    return (
        torch.compiler.is_exporting()
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
    )


class Denoiser(nn.Module):
    """Base of every model here: `model(x, t, y)` predicts eps (and the variance interpolation if learn_sigma)."""

    family: str
    in_channels: int
    out_channels: int
    num_classes: int
    config: dict

    def check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
        """Cheap, export-friendly input validation with errors that name the problem."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"x must be (N, {self.in_channels}, H, W) for this model (in_channels={self.in_channels}), "
                f"got shape {tuple(x.shape)}"
            )
        if t.ndim != 1 or y.ndim != 1:
            raise ValueError(f"t and y must be 1-D (N,), got t {tuple(t.shape)} and y {tuple(y.shape)}")
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise TypeError(f"class labels y must be an integer tensor, got {y.dtype}")
        if _is_tracing() or x.is_meta or y.is_meta:
            return
        if t.shape[0] != x.shape[0] or y.shape[0] != x.shape[0]:
            raise ValueError(f"batch sizes differ: x {x.shape[0]}, t {t.shape[0]}, y {y.shape[0]}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) > self.num_classes):
            raise ValueError(
                f"class labels must lie in [0, {self.num_classes}] ({self.num_classes} = null label), "
                f"got min {int(y.min())} max {int(y.max())}"
            )

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cfg_scale: float,
        cfg_channels: int | str | None = 3,
    ) -> torch.Tensor:
        """Classifier-free guidance as in the official sample.py: batch [z; z] with labels [y; null].

        Guides the first `cfg_channels` output channels (3 = official DiT/U-DiT; None or "all" = every
        latent channel, the standard formulation); the remaining channels keep each half's own values.
        """
        channels = self.in_channels if cfg_channels in (None, "all") else cfg_channels
        if not isinstance(channels, int) or not 1 <= channels <= self.in_channels:
            raise ValueError(
                f"cfg_channels must be an int in [1, {self.in_channels}], None or 'all', got {cfg_channels!r}"
            )
        half = x[: len(x) // 2]
        model_out = self(torch.cat([half, half], dim=0), t, y)
        eps, rest = model_out[:, :channels], model_out[:, channels:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


class PatchEmbed(nn.Module):
    """timm PatchEmbed: p x p stride-p conv, tokens flattened row-major."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def qkv_heads(qkv: nn.Linear, x: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, N, C) tokens -> q, k, v as (B, heads, N, head_dim), from the fused qkv Linear (upstream's keys).

    Three products on row slices of its weight instead of one product then a split: same math, but the
    exported graph has no copy splitting a (B, N, 3, H, D) tensor (ONNX Runtime DiT-S/2 step 4-9% faster).
    Slices, not chunk(): the exporter folds a Slice of a weight into an initializer, but not a Split.
    """
    b, n, _ = x.shape
    dim = qkv.out_features // 3
    return tuple(
        F.linear(x, qkv.weight[i * dim : (i + 1) * dim], qkv.bias[i * dim : (i + 1) * dim])
        .view(b, n, num_heads, dim // num_heads).transpose(1, 2)
        for i in range(3)
    )


class Attention(nn.Module):
    """timm multi-head self-attention over a (grid_h x grid_w) token grid; qkv channels [q | k | v], head-major.

    `window` is None (full softmax attention, exported as standard ONNX) or a CLEAR local window module
    attached by `models.linearize`.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.window: nn.Module | None = None

    def forward(self, x: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = qkv_heads(self.qkv, x, self.num_heads)
        if self.window is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            scale = torch.full((self.num_heads,), self.head_dim**-0.5, dtype=q.dtype, device=q.device)
            out = self.window(q, k, v, scale, grid_h, grid_w)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """timm Mlp: fc1, tanh-GELU, fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero block; modulation chunks: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.adaLN_modulation(c).unsqueeze(1).chunk(6, dim=-1)
        )
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), grid_h, grid_w)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map to p*p*out_channels values per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(Denoiser):
    """Diffusion transformer on patchified latents with adaLN-Zero conditioning on timestep + class."""

    family = "dit"

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(
                f"DiT needs the latent size divisible by the patch size: input_size={input_size}, "
                f"patch_size={patch_size}"
            )
        if hidden_size % num_heads or hidden_size % 4:
            raise ValueError(
                f"DiT needs hidden_size divisible by num_heads and by 4 (2-D sin-cos table), "
                f"got hidden_size={hidden_size}, num_heads={num_heads}"
            )
        self.config = dict(
            input_size=input_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, class_dropout_prob=class_dropout_prob,
            num_classes=num_classes, learn_sigma=learn_sigma,
        )
        self.attention_config = {"kind": "full"}
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_classes = num_classes
        self.grid_size = input_size // patch_size

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Frozen but a Parameter, as upstream: it is in state_dict and counts in the published totals.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size**2, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Upstream init: xavier linears, frozen sin-cos positions, N(0, .02) embedders, zeroed adaLN and output."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        table = sincos_pos_embed_2d(self.pos_embed.shape[-1], self.grid_size)
        self.pos_embed.data.copy_(torch.from_numpy(table).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W); each token's vector is read as (p_row, p_col, channel)."""
        p, g, c = self.patch_size, self.grid_size, self.out_channels
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.check_inputs(x, t, y)
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            raise ValueError(
                f"this DiT was built for {self.input_size}x{self.input_size} latents (its position table is "
                f"fixed), got {tuple(x.shape[-2:])}; rebuild it with input_size=..."
            )
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            x = block(x, c, self.grid_size, self.grid_size)
        return self.unpatchify(self.final_layer(x, c))

