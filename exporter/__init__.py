"""Export to deployable packages (`dit-export`) and check them (`dit-parity`).

    sources.load_source(...)   -> Source: fused float32 denoiser + what the manifest says about it
    package.export_package(source, out, ExportOptions(fp16=True))   -> manifest dict
    manifest.validate_manifest(dict)   schema 1 (docs/architecture.md), torch-free

Modules: sources (checkpoint / official / diffusers / random), export (denoiser graph with dit_ops
nodes), fp16 (mixed-precision conversion), vae (vae_decoder.onnx), onnx_io (torch.onnx + external
data), manifest, parity (Polygraphy data and CLI), package (atomic package writer), cli.
"""
