"""`dit-export`: turn a model (checkpoint, official file, diffusers dir or random weights) into a package."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from exporter import onnx_io

app = typer.Typer(add_completion=False, help="Export a DiT / U-DiT / CLEAR model to an ONNX package directory.")


@app.command()
def main(
    model: Optional[str] = typer.Option(None, help="model name (see models.MODEL_NAMES); optional with --checkpoint"),
    checkpoint: Optional[Path] = typer.Option(None, help="checkpoint directory written by `python -m train`"),
    official: Optional[Path] = typer.Option(None, help="official DiT / U-DiT checkpoint file (needs --model)"),
    diffusers: Optional[Path] = typer.Option(None, help="diffusers DiTPipeline or DiTTransformer2DModel directory"),
    fp16: bool = typer.Option(False, "--fp16", help="also write denoiser.fp16.onnx"),
    attention: Optional[str] = typer.Option(None, help="full or local (CLEAR); default: the source's attention"),
    window_radius: Optional[int] = typer.Option(None, help="local attention: disc radius in tokens"),
    down_factor: Optional[int] = typer.Option(None, help="local attention: d x d pooled key/value tokens (0: none)"),
    latent_size: Optional[int] = typer.Option(None, help="latent side for random / official models and U-DiT"),
    batch: str = typer.Option("dynamic", help="dynamic or static batch dimension"),
    batch_size: int = typer.Option(2, help="batch of a static export (and of the tracing inputs)"),
    opset: int = typer.Option(onnx_io.DEFAULT_OPSET, help=f"ONNX opset {onnx_io.MIN_OPSET}..{onnx_io.MAX_OPSET}"),
    vae: str = typer.Option("checkpoint", help="checkpoint (the source's VAE), none, or a diffusers VAE directory"),
    out: Optional[Path] = typer.Option(None, help="package directory (default packages/<model>)"),
    force: bool = typer.Option(False, "--force", help="replace an existing non-empty --out"),
    seed: int = typer.Option(0, help="seed of random weights when no checkpoint is given"),
    engine: str = typer.Option("onnx", help="onnx, or trt: also build TensorRT engines (needs TensorRT >= 10.9 + GPU)"),
    max_batch: int = typer.Option(8, help="--engine trt: largest denoiser batch (2 x images per call with CFG)"),
) -> None:
    """Write manifest.json, denoiser.onnx (+ .fp16), vae_decoder.onnx and Polygraphy parity data."""
    import logging

    from models.official import CheckpointMismatchError
    from exporter.package import ExportOptions, check_out_dir, export_package
    from exporter.sources import load_source

    # our steps at INFO; onnxscript's optimizer passes log every folded initializer at INFO
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("exporter").setLevel(logging.INFO)
    try:
        if engine not in ("onnx", "trt"):
            raise ValueError(f"--engine {engine!r}: valid choices are onnx, trt")
        if engine == "trt":
            from dit_ops.tensorrt_probe import require_tensorrt

            require_tensorrt()  # fail before a long export, with the reason
        if batch not in ("dynamic", "static"):
            raise ValueError(f"--batch {batch!r}: valid choices are dynamic, static")
        onnx_io.check_opset(opset)
        if out is not None:
            check_out_dir(out, force)
        source = load_source(model=model, checkpoint=checkpoint, official=official, diffusers=diffusers,
                             latent_size=latent_size, attention=attention, radius=window_radius,
                             down_factor=down_factor, seed=seed)
        target = out if out is not None else Path("packages") / source.name
        options = ExportOptions(opset=opset, dynamic_batch=batch == "dynamic", batch_size=batch_size, fp16=fp16,
                                vae=vae)
        manifest = export_package(source, target, options, force=force)
        if engine == "trt":
            _build_engines(target, manifest, max_batch)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, CheckpointMismatchError, RuntimeError) as err:
        typer.echo(f"dit-export: error: {err}", err=True)
        raise typer.Exit(2)
    ops = ", ".join(f"{op['name']} x{op['count']}" for op in manifest["custom_ops"]) or "none"
    typer.echo(f"wrote {target}: {', '.join(manifest['denoiser']['precisions'])} denoiser "
               f"({manifest['model']['name']}, dit_ops nodes: {ops}), "
               f"vae_decoder: {'yes' if manifest['vae_decoder'] else 'no'}")


def _build_engines(package: Path, manifest: dict, max_batch: int) -> None:
    """One strongly typed engine per ONNX file, next to it (`<name>.engine`), recorded in the manifest."""
    from exporter.manifest import refresh_hashes, write_json_atomic
    from exporter.trt_engine import build_engine
    from runtime.tensorrt_session import engine_path_for

    for entry in manifest["denoiser"]["precisions"].values():
        onnx_path = package / entry["file"]
        build_engine(onnx_path, engine_path_for(onnx_path), 1, min(2, max_batch), max_batch)
    if manifest["vae_decoder"]:
        onnx_path = package / manifest["vae_decoder"]["file"]
        build_engine(onnx_path, engine_path_for(onnx_path), 1, 1, max(1, max_batch // 2))
    write_json_atomic(package / "manifest.json", refresh_hashes(package, manifest))


if __name__ == "__main__":
    app()
