"""Both Triton kernels compile ahead of time for sm_80 and sm_90 on a CPU-only machine (PTX + cubin), the
way the TensorRT plugins' aot_impl compiles them; checks the metadata the plugin puts in its launch params.

The compiles run in subprocesses without TRITON_INTERPRET (the interpreter tests set it for this process),
one per target so the two CPU cores work in parallel.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# no `import triton` in this process: triton must first be imported with TRITON_INTERPRET=1 by the
# interpreter tests (its language functions are built for one mode at import time)
pytestmark = [
    pytest.mark.slow,  # ~10 compiles of 5-10 s each
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
]

ROOT = Path(__file__).resolve().parents[1]
MAX_SHARED = {80: 166912, 90: 232448}  # opt-in shared memory per block (A100, H100), bytes

SCRIPT = r"""
import json, sys
from triton.backends.compiler import GPUTarget
from dit_ops.local_window_attention import triton_kernel as lw
from dit_ops.downsampled_attention import triton_kernel as ds

arch = int(sys.argv[1])
target = GPUTarget("cuda", arch, 32)
jobs = []  # (kernel, dtype, variant, build); variant: local down_factor, or -1 = downsampled without RoPE/cosine
for dtype in ("fp16", "fp32"):
    jobs.append(("local", dtype, 0, lambda d=dtype: lw.compile_kernel(
        d, d, 32, 16, 24, 4, 0, lw.default_config(32, d), target)))
    jobs.append(("downsampled", dtype, 0, lambda d=dtype: ds.compile_kernel(
        d, d, 32, 16, 16, True, True, ds.default_config(32, d), target)))
if arch == 90:  # the pooled-token path once
    jobs.append(("local", "fp16", 2, lambda: lw.compile_kernel(
        "fp16", "fp32", 32, 16, 24, 4, 2, lw.default_config(32, "fp16"), target)))
else:  # plain q.k / sqrt(D) logits once
    jobs.append(("downsampled", "fp16", -1, lambda: ds.compile_kernel(
        "fp16", "fp32", 32, 16, 16, False, False, ds.default_config(32, "fp16"), target)))
results = []
for kernel, dtype, down, build in jobs:
    compiled = build()
    results.append({
        "kernel": kernel, "dtype": dtype, "down": down, "arch": arch, "name": compiled.metadata.name,
        "num_warps": compiled.metadata.num_warps, "shared": compiled.metadata.shared,
        "global_scratch": compiled.metadata.global_scratch_size, "ptx": compiled.asm["ptx"],
        "cubin_bytes": len(compiled.asm["cubin"]),
    })
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    procs = [
        subprocess.Popen([sys.executable, "-c", SCRIPT, str(arch)], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for arch in MAX_SHARED
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=1200)
        assert proc.returncode == 0, err[-4000:]
        results += json.loads(out.strip().splitlines()[-1])
    return results


def entry_params(ptx: str, name: str) -> list[str]:
    """Parameter types of the kernel's .entry, in order ('u64' pointers, 'u32' ints)."""
    signature = re.search(r"\.entry\s+" + re.escape(name) + r"\s*\((.*?)\)", ptx, re.S)
    assert signature, f"no .entry {name} in the PTX"
    return re.findall(r"\.param\s+\.(\w+)", signature.group(1))


def test_every_target_and_dtype_compiled(compiled):
    built = {(r["kernel"], r["arch"], r["dtype"], r["down"]) for r in compiled}
    for kernel in ("local", "downsampled"):
        for arch in MAX_SHARED:
            for dtype in ("fp16", "fp32"):
                assert (kernel, arch, dtype, 0) in built
    assert ("local", 90, "fp16", 2) in built  # pooled tokens
    assert ("downsampled", 80, "fp16", -1) in built  # no RoPE, no cosine


def test_ptx_cubin_and_launch_metadata(compiled):
    for r in compiled:
        what = f"{r['kernel']} sm_{r['arch']} {r['dtype']}"
        assert r["name"] in ("_local_window_attention_kernel", "_downsampled_attention_kernel"), what
        assert re.search(rf"\.target\s+sm_{r['arch']}", r["ptx"]), what
        assert r["cubin_bytes"] > 0, what
        assert r["num_warps"] in (4, 8), what  # TensorRT block_x = num_warps * 32
        assert 0 < r["shared"] <= MAX_SHARED[r["arch"]], what
        # AOT plugins get no scratch buffer from TensorRT: the kernels must not need one
        assert r["global_scratch"] == 0, what


def test_kernel_parameters_follow_tensorrt_order(compiled):
    """TensorRT passes input pointers, then the int32 extra args (num_heads), then output pointers."""
    n_inputs = {"local": 5, "downsampled": 4}
    for r in compiled:
        params = entry_params(r["ptx"], r["name"])
        inputs = n_inputs[r["kernel"]]
        assert params[:inputs] == ["u64"] * inputs
        assert params[inputs] == "u32"  # num_heads
        assert params[inputs + 1] == "u64"  # out
        # anything after out is Triton's own trailing scratch pointers, never a kernel argument
        assert all(p == "u64" for p in params[inputs + 2:])
