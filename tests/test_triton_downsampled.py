"""DownsampledAttention Triton kernel under the Triton interpreter (CPU) against the torch reference.

The kernels run in a fresh interpreter with TRITON_INTERPRET=1 (see tests/test_triton_local_window.py).
"""

import math

import pytest

pytest.importorskip("triton")
torch = pytest.importorskip("torch")

from dit_ops.downsampled_attention import schema  # noqa: E402
from dit_ops.downsampled_attention import triton_kernel as tk  # noqa: E402
from tests.test_triton_local_window import run_interpreted  # noqa: E402

TOLERANCE = {"fp32": 1e-4, "fp16": 2e-3}

CASES = [  # grid_h, grid_w, rope, cosine, head_dim, logit_scale, dtype
    (6, 10, True, True, 24, math.log(10.0), "fp32"),  # non-square group grid (3 x 5)
    (8, 4, False, False, 20, 0.0, "fp32"),  # plain q.k / sqrt(D), head_dim not a power of two
    (2, 2, True, True, 16, 1.0, "fp32"),  # one token per group
    (10, 6, True, False, 36, 0.0, "fp32"),  # RoPE without cosine, 15 tokens per group
    (10, 6, True, True, 24, 5.0, "fp16"),  # logit scale above ln 100: clamped to temperature 100
    (6, 8, True, False, 32, 0.0, "fp16"),
    (8, 10, False, True, 16, 4.0, "fp16"),  # 20 tokens per group: two key blocks
    (8, 8, True, True, 32, math.log(100.0), "fp16"),  # temperature 100 with RoPE
]

WORKER = r"""
import json, sys
import torch
from dit_ops.downsampled_attention import triton_kernel as tk
from dit_ops.downsampled_attention.reference import downsampled_attention

def relative_error(out, ref):
    return float((out.float() - ref).abs().max() / ref.abs().max())

results = []
for grid_h, grid_w, rope, cosine, head_dim, logit_scale, dtype in json.loads(sys.argv[1]):
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    torch.manual_seed(grid_h * 100 + grid_w)
    q, k, v = (torch.randn(1, 2, grid_h * grid_w, head_dim).to(dtype) for _ in range(3))
    scales = torch.tensor([logit_scale, logit_scale - 0.5]).to(dtype)
    out = tk.downsampled_attention(q, k, v, scales, grid_h, grid_w, rope, cosine, tk.BlockConfig(16, 16))
    # the reference in fp32 on the same (rounded) inputs is the ground truth for both dtypes
    args = dict(grid_h=grid_h, grid_w=grid_w, rope=rope, cosine=cosine)
    ref = downsampled_attention(q.float(), k.float(), v.float(), scales.float(), **args)
    results.append({
        "error": relative_error(out, ref), "same_dtype": out.dtype == dtype,
        "torch_same_dtype_error": relative_error(downsampled_attention(q, k, v, scales, **args).float(), ref),
    })
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def interpreted() -> list[dict]:
    return run_interpreted(WORKER, CASES)


@pytest.mark.parametrize("case", range(len(CASES)), ids=[str(c) for c in CASES])
def test_kernel_matches_reference(interpreted, case):
    result = interpreted[case]
    assert result["same_dtype"]
    assert result["error"] < TOLERANCE[CASES[case][-1]]


def test_fp16_cosine_logits_keep_fp32_accuracy(interpreted):
    """At temperature 100 the hi/lo split keeps the kernel well inside what plain fp16 torch reaches."""
    result = interpreted[-1]
    assert result["error"] < 2e-3
    assert result["error"] < result["torch_same_dtype_error"]


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
