"""Denoiser export: the fused model -> ONNX with one dit_ops node per special attention, bodies attached.

Graph contract (what the runtime feeds): x float32 (batch, C, H, W), t float32 (batch,) timesteps
in [0, 1000), y int64 (batch,) labels with num_classes as the null label -> out float32
(batch, C or 2C, H, W). The batch dim is symbolic unless a static batch was asked for.
"""
from __future__ import annotations

from collections import Counter

import onnx
import torch

import dit_ops
from dit_ops import DOMAIN, PLUGIN_NAMESPACE
from exporter import lowering, onnx_io
from exporter.sources import Source, expected_custom_nodes

INPUT_NAMES = ["x", "t", "y"]
OUTPUT_NAMES = ["out"]


def example_inputs(source: Source, batch_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tracing inputs; batch 2 by default because torch.export specialises a batch of 1 to a constant."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, *source.latent, generator=g)
    t = torch.randint(0, 1000, (batch_size,), generator=g).float()
    y = torch.randint(0, source.num_classes + 1, (batch_size,), generator=g)
    return x, t, y


def custom_op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(Counter(n.op_type for n in model.graph.node if n.domain == DOMAIN))


def check_custom_nodes(model: onnx.ModelProto, expected: dict[str, int]) -> None:
    """One node per attention layer, each tagged for the TensorRT plugin and backed by a function body."""
    found = custom_op_counts(model)
    wanted = {op: n for op, n in expected.items() if n}
    if found != wanted:
        raise RuntimeError(f"export produced dit_ops nodes {found}, expected one per attention layer: {wanted}")
    bodies = {(f.domain, f.name) for f in model.functions}
    for node in model.graph.node:
        if node.domain != DOMAIN:
            continue
        attrs = {a.name: a for a in node.attribute}
        if attrs.get("plugin_namespace") is None or attrs["plugin_namespace"].s.decode() != PLUGIN_NAMESPACE:
            raise RuntimeError(f"{node.name} ({node.op_type}) lacks plugin_namespace={PLUGIN_NAMESPACE!r}")
        if (DOMAIN, node.op_type) not in bodies:
            raise RuntimeError(f"no function body attached for {DOMAIN}::{node.op_type}")


def export_denoiser(source: Source, opset: int, dynamic_batch: bool = True, batch_size: int = 2) -> onnx.ModelProto:
    """The fp32 denoiser as an in-memory ModelProto (dit_ops bodies attached, custom nodes checked)."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    trace_batch = max(batch_size, 2) if dynamic_batch else batch_size
    model = onnx_io.export_module(
        source.model, example_inputs(source, trace_batch), INPUT_NAMES, OUTPUT_NAMES, opset, dynamic_batch,
        custom_translation_table=dit_ops.translation_table() | lowering.translation_table(),
    )
    model = dit_ops.attach_functions(model)
    check_custom_nodes(model, expected_custom_nodes(source.model))
    return model
