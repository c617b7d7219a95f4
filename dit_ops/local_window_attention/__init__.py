"""CLEAR local-window attention op (`dit_ops::LocalWindowAttention`).

`schema` is torch-free; import `reference` (torch) or `onnx_function` (onnxscript) explicitly.
"""
