"""Custom attention ops of dit-edge, one sub-package per op (see docs/architecture.md).

Importing this package (or any `schema` module) never imports torch, so the torch-free runtime and
the TensorRT plugin side can read op names, attributes and tile plans. The torch side lives in
`<op>.reference` (custom ops, eager paths) and `dit_ops.export` (torch.onnx translation table); the
ONNX function bodies in `<op>.onnx_function` and `dit_ops.onnx_functions`.
"""

DOMAIN = "dit_ops"  # ONNX domain of the custom nodes, torch.library namespace, TensorRT plugin namespace
OPSET_VERSION = 1  # version of the `dit_ops` ONNX opset
PLUGIN_NAMESPACE = DOMAIN  # node attribute `plugin_namespace` (TensorRT parser picks the plugin by it)
PLUGIN_VERSION = "1"  # node attribute `plugin_version` (TensorRT QDP plugins are always version "1")


def translation_table() -> dict:
    """`custom_translation_table` for torch.onnx.export; imports torch (see `dit_ops.export`)."""
    from dit_ops.export import translation_table as _table

    return _table()


def attach_functions(model):
    """Append the ONNX function bodies of the dit_ops nodes in `model` (see `dit_ops.onnx_functions`)."""
    from dit_ops.onnx_functions import attach_functions as _attach

    return _attach(model)


def load_tensorrt_plugins() -> None:
    """Register both ops' TensorRT plugins (imports tensorrt; see `dit_ops.tensorrt_probe`)."""
    from dit_ops.tensorrt_probe import load_tensorrt_plugins as _load

    _load()
