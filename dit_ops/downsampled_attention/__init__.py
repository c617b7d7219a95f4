"""U-DiT downsampled-token attention op (`dit_ops::DownsampledAttention`).

`schema` is torch-free; import `reference` (torch) or `onnx_function` (onnxscript) explicitly.
"""
