"""Build a strongly typed TensorRT engine from an exported ONNX denoiser, with the dit_ops plugins.

- The network is strongly typed: precision comes from the graph (fp16 casts, Q/DQ), never from builder
  precision flags (TensorRT 11 has none; on 10.x the STRONGLY_TYPED creation flag is set).
- Network flag PREFER_AOT_PYTHON_PLUGINS: the dit_ops nodes become the plugins' AOT implementation
  (Triton PTX baked into the engine), so the engine runs in trtexec / C++ without Python.
- dit_ops nodes must carry plugin_namespace="dit_ops": only then does the ONNX parser pick the plugin
  over the node's ONNX function body on every TensorRT >= 10.7.
- One optimization profile over the batch dimension (dim 0 of every input); other dims are static.
The engine is only valid on the GPU model and TensorRT version that built it.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from dit_ops import DOMAIN, PLUGIN_NAMESPACE
from dit_ops.tensorrt_probe import load_tensorrt_plugins, probe, require_tensorrt

__all__ = ["batch_profile", "plugin_nodes", "build_engine"]

Shape = tuple[int, ...]


def _load_graph(onnx_path: str | Path) -> onnx.ModelProto:
    path = Path(onnx_path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {path}")
    return onnx.load(str(path), load_external_data=False)


def batch_profile(
    onnx_path: str | Path, min_batch: int, opt_batch: int, max_batch: int,
) -> dict[str, tuple[Shape, Shape, Shape]]:
    """{input name: (min, opt, max) shape}: dim 0 takes the batch sizes, the other dims must be static."""
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(f"need 1 <= min_batch <= opt_batch <= max_batch, got {min_batch}, {opt_batch}, {max_batch}")
    model = _load_graph(onnx_path)
    initializers = {init.name for init in model.graph.initializer}
    profile = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        if not dims:
            raise ValueError(f"input {value.name!r} has no batch dimension (rank 0); cannot build a batch profile")
        rest = []
        for axis, dim in enumerate(dims[1:], start=1):
            if not dim.HasField("dim_value") or dim.dim_value <= 0:
                raise ValueError(
                    f"input {value.name!r} dim {axis} is dynamic ({dim.dim_param or '?'}); only dim 0 (batch) may be"
                )
            rest.append(dim.dim_value)
        profile[value.name] = tuple((batch, *rest) for batch in (min_batch, opt_batch, max_batch))
    return profile


def plugin_nodes(onnx_path: str | Path) -> dict[str, int]:
    """{op_type: count} of the dit_ops nodes; ValueError if one lacks plugin_namespace="dit_ops"."""
    model = _load_graph(onnx_path)
    counts: dict[str, int] = {}
    nodes = list(model.graph.node) + [node for function in model.functions for node in function.node]
    for node in nodes:
        if node.domain != DOMAIN:
            continue
        namespace = next((a.s.decode() for a in node.attribute if a.name == "plugin_namespace"), None)
        if namespace != PLUGIN_NAMESPACE:
            raise ValueError(
                f"node {node.name!r} ({node.domain}::{node.op_type}) has plugin_namespace={namespace!r}, "
                f"expected {PLUGIN_NAMESPACE!r}: TensorRT would inline its ONNX function instead of the plugin"
            )
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def build_engine(
    onnx_path: str | Path, engine_path: str | Path, min_batch: int = 1, opt_batch: int = 1, max_batch: int = 8,
    *, workspace_gib: float | None = None, optimization_level: int | None = None,
    timing_cache: str | Path | None = None,
) -> Path:
    """Build and save a strongly typed engine for `onnx_path` (batch profile min/opt/max); returns engine_path.

    Batch counts rows of the denoiser input: with classifier-free guidance the Sampler feeds
    2 x (images per call), so pick max_batch accordingly. Raises TensorRTUnavailable (with the reason)
    when TensorRT >= 10.9 or a GPU is missing.
    """
    trt = require_tensorrt()
    profile = batch_profile(onnx_path, min_batch, opt_batch, max_batch)
    if plugin_nodes(onnx_path):
        load_tensorrt_plugins()

    from polygraphy.backend.common import SaveBytes
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, Profile
    from polygraphy.backend.trt import util as trt_util

    def network():
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.PREFER_AOT_PYTHON_PLUGINS)
        if not probe().strongly_typed_only:
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        builder = trt.Builder(trt_util.get_trt_logger())
        net = builder.create_network(flags)
        parser = trt.OnnxParser(net, trt_util.get_trt_logger())
        if not parser.parse_from_file(str(onnx_path)):
            errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse {onnx_path}:\n{errors}")
        return builder, net, parser

    shapes = Profile()
    for name, (lo, opt, hi) in profile.items():
        shapes.add(name, min=lo, opt=opt, max=hi)
    config = CreateConfig(
        profiles=[shapes],
        memory_pool_limits=(
            None if workspace_gib is None else {trt.MemoryPoolType.WORKSPACE: int(workspace_gib * 2**30)}
        ),
        builder_optimization_level=optimization_level,
        load_timing_cache=None if timing_cache is None else str(timing_cache),
    )
    engine_path = Path(engine_path)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine = EngineBytesFromNetwork(network, config=config,
                                    save_timing_cache=None if timing_cache is None else str(timing_cache))
    SaveBytes(engine, str(engine_path))()
    return engine_path
