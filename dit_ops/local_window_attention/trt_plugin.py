"""TensorRT plugin `dit_ops::LocalWindowAttention` (tensorrt.plugin QDP, TensorRT >= 10.9).

Importing this module registers the plugin in TensorRT's global registry; it imports tensorrt at the
top, so only `dit_ops.tensorrt_probe.load_tensorrt_plugins()` imports it, never the ONNX Runtime path.

- register: output = q's shape and dtype; attributes are checked with the op schema.
- autotune: q, k, v, out in FP32 or FP16, scale / pool_weight independently FP32 or FP16.
- aot_impl: the Triton kernel compiled to PTX for the build GPU, launch grid from shape expressions,
  so the engine runs without Python (trtexec, C++).
- impl: JIT fallback, launches the same compiled kernel on TensorRT's stream (no torch needed).
Kernel parameters are inputs, then the int32 extra arguments, then outputs, as TensorRT passes them.
No `from __future__ import annotations` here: tensorrt.plugin reads the annotations as types.
"""

from typing import List, Tuple

import tensorrt as trt
import tensorrt.plugin as trtp
import triton

from dit_ops.local_window_attention import schema
from dit_ops.local_window_attention import triton_kernel as tk

_DTYPES = {trt.float32: "fp32", trt.float16: "fp16"}


def _dtype_name(dtype: trt.DataType, what: str) -> str:
    if dtype not in _DTYPES:
        raise ValueError(f"{tk.PLUGIN_ID}: {what} must be FP32 or FP16, got {dtype}")
    return _DTYPES[dtype]


def _static_dims(desc: trtp.TensorDesc) -> tuple[int, ...] | None:
    """Concrete dims with -1 for dynamic ones, or None while TensorRT only asks for output dtypes."""
    exprs = list(desc.shape_expr)
    if any(e.is_fake for e in exprs):
        return None
    return tuple(e.constant_value() if e.is_constant else -1 for e in exprs)


@trtp.register(tk.PLUGIN_ID)
def local_window_attention_desc(
    q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, scale: trtp.TensorDesc,
    pool_weight: trtp.TensorDesc, grid_h: int, grid_w: int, radius: int, down_factor: int,
) -> trtp.TensorDesc:
    schema.validate_attributes(grid_h, grid_w, radius, down_factor)
    _dtype_name(q.dtype, "q")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{tk.PLUGIN_ID}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    dims = [_static_dims(t) for t in (q, k, v, scale, pool_weight)]
    if dims[0] is not None:
        if -1 in dims[0][1:]:
            raise ValueError(f"{tk.PLUGIN_ID}: heads, tokens and head_dim must be static (only batch may vary)")
        schema.check_shapes(*dims, grid_h, grid_w, radius, down_factor)
    return q.like()


@trtp.autotune(tk.PLUGIN_ID)
def local_window_attention_autotune(
    q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, scale: trtp.TensorDesc,
    pool_weight: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc],
) -> List[trtp.AutoTuneCombination]:
    # positions: q, k, v, scale, pool_weight, out; "A|B" entries pair up by index across positions
    return [
        trtp.AutoTuneCombination("FP32|FP16, FP32|FP16, FP32|FP16, FP32, FP32, FP32|FP16"),
        trtp.AutoTuneCombination("FP32|FP16, FP32|FP16, FP32|FP16, FP16, FP16, FP32|FP16"),
    ]


@trtp.aot_impl(tk.PLUGIN_ID)
def local_window_attention_aot_impl(
    q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, scale: trtp.TensorDesc,
    pool_weight: trtp.TensorDesc, grid_h: int, grid_w: int, radius: int, down_factor: int,
    outputs: Tuple[trtp.TensorDesc], tactic: int,
) -> Tuple[bytes, bytes, trtp.KernelLaunchParams, trtp.SymExprs]:
    dtype = _dtype_name(q.dtype, "q")
    head_dim = q.shape_expr[3].constant_value()
    config = tk.default_config(head_dim, dtype)
    compiled = tk.compile_kernel(
        dtype, _dtype_name(scale.dtype, "scale"), head_dim, grid_h, grid_w, radius, down_factor, config,
        triton.runtime.driver.active.get_current_target(),
    )
    grid_x, grid_y, grid_z = tk.launch_grid(q.shape_expr[0], q.shape_expr[1], grid_h, grid_w, config)
    launch = trtp.KernelLaunchParams(
        grid_x=grid_x, grid_y=grid_y, grid_z=grid_z,
        block_x=compiled.metadata.num_warps * 32, shared_mem=compiled.metadata.shared,
    )
    extra_args = trtp.SymIntExprs.from_tuple([trtp.SymInt32(q.shape_expr[1])])  # num_heads
    return compiled.metadata.name.encode(), compiled.asm["ptx"].encode(), launch, extra_args


@trtp.impl(tk.PLUGIN_ID)
def local_window_attention_impl(
    q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor, scale: trtp.Tensor, pool_weight: trtp.Tensor,
    grid_h: int, grid_w: int, radius: int, down_factor: int, outputs: Tuple[trtp.Tensor], stream: int,
) -> None:
    batch, heads, _, head_dim = tuple(q.shape)
    dtype = _dtype_name(q.dtype, "q")
    config = tk.default_config(head_dim, dtype)
    compiled = tk.compile_kernel(dtype, _dtype_name(scale.dtype, "scale"), head_dim, grid_h, grid_w, radius,
                                 down_factor, config, triton.runtime.driver.active.get_current_target())
    args = tk.kernel_arguments(q.data_ptr, k.data_ptr, v.data_ptr, scale.data_ptr, pool_weight.data_ptr, heads,
                               outputs[0].data_ptr, grid_h, grid_w, radius, down_factor, head_dim, config)
    compiled[tk.launch_grid(batch, heads, grid_h, grid_w, config)](*args, stream=stream)
