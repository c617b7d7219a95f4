"""TensorRT probe, plugin loading, import boundaries, and the plugin definitions checked against the op schemas.

The plugin modules import tensorrt, so where TensorRT is missing their definitions are checked from source
(signatures and autotune strings); where it is present and a GPU works they are imported and registered.
"""

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dit_ops import tensorrt_probe
from dit_ops.downsampled_attention import schema as ds_schema
from dit_ops.local_window_attention import schema as lw_schema

ROOT = Path(__file__).resolve().parents[1]
TRT_INSTALLED = importlib.util.find_spec("tensorrt") is not None

# (module path, schema, attributes the plugin declares) per op
PLUGINS = {
    "dit_ops/local_window_attention/trt_plugin.py": (lw_schema, ("grid_h", "grid_w", "radius", "down_factor")),
    "dit_ops/downsampled_attention/trt_plugin.py": (ds_schema, ("grid_h", "grid_w", "rope", "cosine")),
}


def test_parse_version():
    assert tensorrt_probe.parse_version("10.13.3.9") == (10, 13, 3, 9)
    assert tensorrt_probe.parse_version("11.0.0rc1") == (11, 0, 0)
    assert tensorrt_probe.parse_version("10.9") >= tensorrt_probe.MIN_VERSION
    assert tensorrt_probe.parse_version("10.8.0.43") < tensorrt_probe.MIN_VERSION
    with pytest.raises(ValueError, match="cannot parse"):
        tensorrt_probe.parse_version("dev")


def test_status_flags_strong_typing_by_version():
    assert tensorrt_probe.TensorRTStatus(True, "11.4.0.106", "").strongly_typed_only
    assert not tensorrt_probe.TensorRTStatus(True, "10.13.3.9", "").strongly_typed_only


@pytest.mark.skipif(TRT_INSTALLED, reason="TensorRT is installed here")
def test_missing_tensorrt_is_reported_with_a_reason():
    status = tensorrt_probe.probe()
    assert not status.available and status.version is None
    assert "TensorRT is not installed" in status.reason and "dit-edge[tensorrt]" in status.reason
    with pytest.raises(tensorrt_probe.TensorRTUnavailable, match="not installed"):
        tensorrt_probe.require_tensorrt()
    with pytest.raises(tensorrt_probe.TensorRTUnavailable, match="not installed"):
        tensorrt_probe.load_tensorrt_plugins()


def test_plugins_register_where_tensorrt_and_a_gpu_exist():
    status = tensorrt_probe.probe()
    if not status.available:
        pytest.skip(status.reason)
    import tensorrt as trt

    ids = tensorrt_probe.load_tensorrt_plugins()
    assert ids == ["dit_ops::DownsampledAttention", "dit_ops::LocalWindowAttention"]
    registry = trt.get_plugin_registry()
    for plugin in ids:
        namespace, name = plugin.split("::")
        assert registry.get_creator(name, "1", namespace) is not None, plugin


def test_onnx_runtime_path_never_imports_tensorrt_or_the_plugins():
    script = (
        "import json, sys\n"
        "import runtime, runtime.tensorrt_session, exporter.trt_engine, dit_ops.tensorrt_probe\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    modules = json.loads(result.stdout.strip().splitlines()[-1])
    top = {name.split(".")[0] for name in modules}
    assert top.isdisjoint({"tensorrt", "triton", "torch"}), top & {"tensorrt", "triton", "torch"}
    assert not [name for name in modules if name.endswith(("trt_plugin", "triton_kernel"))]


def _functions(path: str) -> dict[str, ast.FunctionDef]:
    tree = ast.parse((ROOT / path).read_text())
    return {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}


def _decorator(fn: ast.FunctionDef) -> str:
    (decorator,) = fn.decorator_list
    return decorator.func.attr  # trtp.<register | autotune | aot_impl | impl>(PLUGIN_ID)


@pytest.mark.parametrize("path", PLUGINS)
def test_plugin_signatures_follow_the_op_schema(path):
    """Inputs in the node's order, the declared attributes, and what each QDP callback must take."""
    schema, attributes = PLUGINS[path]
    by_kind = {_decorator(fn): [a.arg for a in fn.args.args] for fn in _functions(path).values() if fn.decorator_list}
    inputs = list(schema.INPUTS)
    assert set(attributes) <= set(schema.ATTRIBUTES)
    assert by_kind["register"] == inputs + list(attributes)
    # TensorRT passes every attribute positionally to aot_impl, in the register order
    assert by_kind["aot_impl"] == inputs + list(attributes) + ["outputs", "tactic"]
    assert by_kind["impl"] == inputs + list(attributes) + ["outputs", "stream"]
    assert by_kind["autotune"] == inputs + ["outputs"]


@pytest.mark.parametrize("path", PLUGINS)
def test_plugin_annotations_are_real_types(path):
    """tensorrt.plugin tells tensors from attributes by their annotations: they must not be strings."""
    tree = ast.parse((ROOT / path).read_text())
    futures = [a.name for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "__future__" for a in n.names]
    assert "annotations" not in futures
    for fn in _functions(path).values():
        if fn.decorator_list:
            assert all(arg.annotation is not None for arg in fn.args.args), fn.name
            assert fn.returns is not None, fn.name


@pytest.mark.parametrize("path", PLUGINS)
def test_autotune_combinations_cover_fp32_and_fp16(path):
    """Each combination names a type for every input and output; together they pair q/k/v/out dtypes
    with either dtype for the small parameter tensors."""
    schema, _ = PLUGINS[path]
    (autotune,) = [fn for fn in _functions(path).values() if fn.decorator_list and _decorator(fn) == "autotune"]
    specs = [n.value for n in ast.walk(autotune) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    combos = set()
    for spec in specs:
        positions = [p.strip().split("|") for p in spec.split(",")]
        assert len(positions) == len(schema.INPUTS) + len(schema.OUTPUTS), spec
        width = max(len(p) for p in positions)
        for i in range(width):
            combos.add(tuple(p[i] if len(p) > 1 else p[0] for p in positions))
    tensors = [schema.INPUTS.index(name) for name in ("q", "k", "v")] + [len(schema.INPUTS)]
    params = [i for i, name in enumerate(schema.INPUTS) if name not in ("q", "k", "v")]
    seen = {({c[i] for i in tensors}.pop(), {c[i] for i in params}.pop()) for c in combos
            if len({c[i] for i in tensors}) == 1 and len({c[i] for i in params}) == 1}
    assert len(seen) == len(combos)  # no combination mixes dtypes inside q/k/v/out or inside the parameters
    assert seen == {(a, b) for a in ("FP32", "FP16") for b in ("FP32", "FP16")}
