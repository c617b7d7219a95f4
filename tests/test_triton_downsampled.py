"""DownsampledAttention Triton kernel under the Triton interpreter (CPU) against the torch reference."""

import math
import os
import sys

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set; the interpreter tests cannot run")
os.environ["TRITON_INTERPRET"] = "1"  # before the kernel module is imported: kernels run on CPU

import pytest

pytest.importorskip("triton")
torch = pytest.importorskip("torch")

from dit_ops.downsampled_attention import schema  # noqa: E402
from dit_ops.downsampled_attention import triton_kernel as tk  # noqa: E402
from dit_ops.downsampled_attention.reference import downsampled_attention  # noqa: E402

TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3}

CASES = [  # grid_h, grid_w, rope, cosine, head_dim, logit_scale, dtype
    (6, 10, True, True, 24, math.log(10.0), torch.float32),  # non-square group grid (3 x 5)
    (8, 4, False, False, 20, 0.0, torch.float32),  # plain q.k / sqrt(D), head_dim not a power of two
    (2, 2, True, True, 16, 1.0, torch.float32),  # one token per group
    (10, 6, True, False, 36, 0.0, torch.float32),  # RoPE without cosine, 15 tokens per group
    (10, 6, True, True, 24, 5.0, torch.float16),  # logit scale above ln 100: clamped to temperature 100
    (6, 8, True, False, 32, 0.0, torch.float16),
    (8, 10, False, True, 16, 4.0, torch.float16),  # 20 tokens per group: two key blocks
]


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("grid_h, grid_w, rope, cosine, head_dim, logit_scale, dtype", CASES)
def test_kernel_matches_reference(grid_h, grid_w, rope, cosine, head_dim, logit_scale, dtype):
    torch.manual_seed(grid_h * 100 + grid_w)
    batch, heads = 1, 2
    q, k, v = (torch.randn(batch, heads, grid_h * grid_w, head_dim).to(dtype) for _ in range(3))
    scales = torch.tensor([logit_scale, logit_scale - 0.5]).to(dtype)
    out = tk.downsampled_attention(q, k, v, scales, grid_h, grid_w, rope, cosine, tk.BlockConfig(16, 16))
    # the reference in fp32 on the same (rounded) inputs is the ground truth for both dtypes
    ref = downsampled_attention(q.float(), k.float(), v.float(), scales.float(), grid_h=grid_h, grid_w=grid_w,
                                rope=rope, cosine=cosine)
    assert out.dtype == dtype
    assert relative_error(out, ref) < TOLERANCE[dtype]


def test_fp16_cosine_logits_keep_fp32_accuracy():
    """At temperature 100 the hi/lo split keeps the kernel well inside what plain fp16 torch reaches."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8 * 8, 32).half() for _ in range(3))
    scales = torch.full((2,), schema.MAX_LOGIT_SCALE).half()
    args = dict(grid_h=8, grid_w=8, rope=True, cosine=True)
    ref = downsampled_attention(q.float(), k.float(), v.float(), scales.float(), **args)
    out = tk.downsampled_attention(q, k, v, scales, 8, 8, True, True, tk.BlockConfig(16, 16))
    torch_fp16 = downsampled_attention(q, k, v, scales, **args)
    assert relative_error(out, ref) < 2e-3
    assert relative_error(out, ref) < relative_error(torch_fp16, ref)


def test_bad_inputs_name_the_problem():
    q = torch.zeros(1, 2, 15, 16)
    with pytest.raises(ValueError, match="even"):
        tk.downsampled_attention(q, q, q, torch.ones(2), 3, 5, True, True)
    q = torch.zeros(1, 2, 16, 18)
    with pytest.raises(ValueError, match="divisible by 4"):
        tk.downsampled_attention(q, q, q, torch.ones(2), 4, 4, True, True)
    with pytest.raises(ValueError, match="power of two"):
        tk.BlockConfig(24, 16)
    with pytest.raises(ValueError, match="dtype must be one of"):
        tk.default_config(64, "bf16")


def test_launch_grid_and_plugin_attributes():
    config = tk.BlockConfig(64, 32)
    # 32 x 48 grid -> 16 x 24 = 384 tokens per group -> 6 query blocks; 2 x 3 heads x 4 groups
    assert tk.launch_grid(2, 3, 32, 48, config) == (6, 24, 1)
    assert set(tk.PLUGIN_ATTRIBUTES) <= set(schema.ATTRIBUTES)
    assert tk.PLUGIN_ID == "dit_ops::DownsampledAttention"
