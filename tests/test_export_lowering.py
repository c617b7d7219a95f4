"""exporter.lowering: the exporter's own translation of F.scaled_dot_product_attention.

Plain calls become softmax((q * scale) k^T) v with a constant scale (no shape ops, one transpose of k);
masked, causal and grouped-query calls keep torchlib's translation. Every case is checked against torch.
"""
from collections import Counter

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from exporter import lowering, onnx_io


class Attention(torch.nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, **self.kwargs)


def _export_and_run(module: torch.nn.Module, q, k, v) -> tuple[Counter, np.ndarray]:
    model = onnx_io.export_module(module, (q, k, v), ["q", "k", "v"], ["out"], onnx_io.DEFAULT_OPSET,
                                  dynamic_batch=True, custom_translation_table=lowering.translation_table())
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    # a different batch than the trace's: the graph must not have baked it in
    feeds = {name: torch.cat([t, t[:1]]).numpy() for name, t in zip("qkv", (q, k, v))}
    return Counter(node.op_type for node in model.graph.node), session.run(None, feeds)[0]


def _inputs(seed: int = 0, heads: int = 3, kv_heads: int = 3) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, 10, 16, generator=g) * 3
    k = torch.randn(2, kv_heads, 12, 16, generator=g) * 3
    v = torch.randn(2, kv_heads, 12, 16, generator=g)
    return q, k, v


@pytest.mark.parametrize("scale", [None, 0.3])
def test_plain_attention_is_one_product_pair_with_a_constant_scale(scale):
    q, k, v = _inputs()
    module = Attention(scale=scale)
    counts, out = _export_and_run(module, q, k, v)
    reference = module(*(torch.cat([t, t[:1]]) for t in (q, k, v))).numpy()
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)
    assert counts == Counter({"Mul": 1, "Transpose": 1, "MatMul": 2, "Softmax": 1}), counts


@pytest.mark.parametrize("kwargs", [dict(is_causal=True), dict(enable_gqa=True)], ids=["causal", "gqa"])
def test_other_calls_keep_torchlib_translation(kwargs):
    q, k, v = _inputs(seed=1, heads=4, kv_heads=2 if kwargs.get("enable_gqa") else 4)
    if kwargs.get("is_causal"):
        k, v = k[:, :, :10], v[:, :, :10]
    module = Attention(**kwargs)
    counts, out = _export_and_run(module, q, k, v)
    reference = module(*(torch.cat([t, t[:1]]) for t in (q, k, v))).numpy()
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)
    assert counts["Shape"] >= 1  # torchlib's graph: it reads sizes back at run time


def test_masked_attention_keeps_torchlib_translation():
    q, k, v = _inputs(seed=2)
    mask = torch.randn(10, 12)

    class Masked(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    counts, out = _export_and_run(Masked(), q, k, v)
    reference = Masked()(*(torch.cat([t, t[:1]]) for t in (q, k, v))).numpy()
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)
    assert counts["Add"] >= 1  # the mask is added to the logits
