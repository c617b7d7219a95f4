"""dit-export on tiny DiT, U-DiT, DiT + CLEAR and U-DiT + CLEAR: custom nodes, checker, ORT vs PyTorch.

One package per family (fp32 + fp16) is exported once per module. PyTorch references are computed
before the export traces the model.
"""
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from dit_ops import DOMAIN, PLUGIN_NAMESPACE, PLUGIN_VERSION
from dit_ops.downsampled_attention import schema as downsampled_schema
from dit_ops.local_window_attention import schema as local_schema
from exporter import onnx_io, sources
from exporter.manifest import load_manifest, validate_manifest, verify_files
from exporter.package import ExportOptions, export_package
from models.linearize import ATTENTION_LAYERS

TINY_DIT = dict(name="dit_tiny_2", latent_size=8, overrides=dict(depth=2, hidden_size=32, num_heads=2))
TINY_UDIT = dict(name="udit_tiny", latent_size=16, overrides=dict(depth=[1, 1, 1, 1, 1], hidden_size=16, num_heads=2))
FAMILIES = {
    "dit": dict(TINY_DIT),
    "udit": dict(TINY_UDIT),
    "dit_local": dict(TINY_DIT, attention="local", radius=2, down_factor=2),
    "udit_local": dict(TINY_UDIT, attention="local", radius=2, down_factor=2),
}
# U-DiT at latent 16, depth [1]*5, two attention sub-layers per block: stage sides 16, 8, 4, 8, 16
UDIT_GRIDS = [16, 16, 8, 8, 4, 4, 8, 8, 16, 16]
pytestmark = pytest.mark.slow


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _sweep_feeds(source: sources.Source) -> dict:
    """Every timestep 0..999 once, x_t from the forward process, labels cycling through all classes + null."""
    rng = np.random.default_rng(2)
    t = np.arange(1000)
    acp = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[t].reshape(-1, 1, 1, 1)
    x0 = rng.standard_normal((1000, *source.latent)).clip(-3, 3)
    x = np.sqrt(acp) * x0 + np.sqrt(1 - acp) * rng.standard_normal(x0.shape)
    y = t % (source.num_classes + 1)
    return {"x": x.astype(np.float32), "t": t.astype(np.float32), "y": y.astype(np.int64)}


@pytest.fixture(scope="module", params=list(FAMILIES))
def exported(request, tmp_path_factory):
    spec = dict(FAMILIES[request.param])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = sources.from_random(spec.pop("name"), **spec)
    sweep = _sweep_feeds(source)
    extra = {"x": sweep["x"][::333][:3].copy(), "t": sweep["t"][::333][:3].copy(), "y": sweep["y"][::333][:3].copy()}
    with torch.no_grad():
        ref_sweep = torch.cat([
            source.model(*(torch.from_numpy(sweep[k][i:i + 250]) for k in "xty")) for i in range(0, 1000, 250)
        ]).numpy()
        ref_extra = source.model(*(torch.from_numpy(extra[k]) for k in "xty")).numpy()
    expected = sources.expected_custom_nodes(source.model)
    layers = [m for m in source.model.modules() if isinstance(m, ATTENTION_LAYERS)]
    out = tmp_path_factory.mktemp(request.param) / "pkg"
    manifest = export_package(source, out, ExportOptions(fp16=True))
    return dict(family=request.param, source=source, out=out, manifest=manifest, expected=expected,
                layers=len(layers), sweep=sweep, ref_sweep=ref_sweep, extra=extra, ref_extra=ref_extra)


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_one_custom_node_per_attention_layer(exported):
    model = onnx.load(str(exported["out"] / "denoiser.onnx"))
    nodes = [n for n in model.graph.node if n.domain == DOMAIN]
    family = exported["family"]
    op_type = {"dit": None, "udit": "DownsampledAttention"}.get(family, "LocalWindowAttention")
    if op_type is None:  # plain DiT attention stays standard ONNX
        assert nodes == []
        assert any(n.op_type == "Softmax" for n in model.graph.node)
        return
    assert len(nodes) == exported["layers"] > 0
    assert {n.op_type for n in nodes} == {op_type}
    assert exported["expected"][op_type] == len(nodes)
    assert {(f.domain, f.name) for f in model.functions} == {(DOMAIN, op_type)}
    assert any(o.domain == DOMAIN and o.version == 1 for o in model.opset_import)
    schema = local_schema if op_type == "LocalWindowAttention" else downsampled_schema
    grids = []
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert set(schema.ATTRIBUTES) <= attrs.keys()
        assert attrs["plugin_namespace"] == PLUGIN_NAMESPACE.encode()
        assert attrs["plugin_version"] == PLUGIN_VERSION.encode()
        assert attrs["num_heads"] == 2
        assert list(node.input[:3]) and len(node.input) == len(schema.INPUTS)
        grids.append(attrs["grid_h"])
        if op_type == "LocalWindowAttention":
            assert (attrs["radius"], attrs["down_factor"]) == (2, 2)
        else:
            assert (attrs["rope"], attrs["cosine"]) == (1, 1)
    if family == "udit":
        assert grids == UDIT_GRIDS
    elif family == "udit_local":  # CLEAR runs on each stage's half-resolution group grid
        assert grids == [g // 2 for g in UDIT_GRIDS]
    else:
        assert grids == [4, 4]  # latent 8 / patch 2
    assert [c["count"] for c in exported["manifest"]["custom_ops"]] == [len(nodes)]


def test_checker_full_check_passes(exported):
    for name in ("denoiser.onnx", "denoiser.fp16.onnx"):
        onnx_io.check_model(exported["out"] / name)


def test_graph_boundary_is_float32_int64_with_dynamic_batch(exported):
    for name in ("denoiser.onnx", "denoiser.fp16.onnx"):
        specs = onnx_io.io_specs(onnx.load(str(exported["out"] / name)).graph.input)
        c, h, w = exported["source"].latent
        assert specs == [{"name": "x", "dtype": "float32", "shape": ["batch", c, h, w]},
                         {"name": "t", "dtype": "float32", "shape": ["batch"]},
                         {"name": "y", "dtype": "int64", "shape": ["batch"]}]


def test_fp32_matches_pytorch(exported):
    session = _session(exported["out"] / "denoiser.onnx")
    got = session.run(None, exported["extra"])[0]  # batch 3: not the traced batch
    ref = exported["ref_extra"]
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    sweep = session.run(None, {k: v[:250] for k, v in exported["sweep"].items()})[0]
    ref = exported["ref_sweep"][:250]
    assert np.abs(sweep - ref).max() <= 1e-4 * np.abs(ref).max()


def test_fp16_weights_and_parity_over_all_timesteps(exported):
    model = onnx.load(str(exported["out"] / "denoiser.fp16.onnx"))
    weights = [t for t in model.graph.initializer if onnx.numpy_helper.to_array(t).size > 16]
    half = [t for t in weights if t.data_type == onnx.TensorProto.FLOAT16]
    assert len(half) >= 0.9 * len(weights)
    session = _session(exported["out"] / "denoiser.fp16.onnx")
    got = np.concatenate([session.run(None, {k: v[i:i + 250] for k, v in exported["sweep"].items()})[0]
                          for i in range(0, 1000, 250)])
    assert got.dtype == np.float32
    assert np.isfinite(got).all()
    ref = exported["ref_sweep"]
    per_chunk = [_cosine(got[i:i + 50], ref[i:i + 50]) for i in range(0, 1000, 50)]  # t = 0..49, ..., 950..999
    assert min(per_chunk) >= 0.999, per_chunk


def test_manifest_validates_and_hashes_match(exported):
    manifest = load_manifest(exported["out"])
    assert manifest == exported["manifest"]
    validate_manifest(manifest)
    assert verify_files(exported["out"], manifest) == []
    assert set(manifest["denoiser"]["precisions"]) == {"fp32", "fp16"}
    assert manifest["model"]["family"] == exported["source"].family
    assert manifest["model"]["attention"]["kind"] == ("local" if "local" in exported["family"] else "full")
    assert manifest["classes"] == {"num_classes": 1000, "null_label": 1000}
    assert manifest["cfg"] == {"channels": 3}
    assert manifest["vae_decoder"] is None and manifest["image"] is None
    assert set(manifest["files"]) == {"denoiser.onnx", "denoiser.fp16.onnx", "parity/inputs.json",
                                      "parity/torch_outputs.json"}
