"""Writing a package directory: denoiser(s), VAE decoder, parity data and manifest, all or nothing.

Everything is written into a hidden staging directory next to `out` and renamed into place at the
end, so an interrupted export never leaves a half-written package (or destroys the previous one).
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dit_ops
from exporter import fp16, onnx_io
from exporter.export import custom_op_counts, export_denoiser
from exporter.manifest import (SCHEMA_VERSION, TOLERANCES, default_mode, hash_files, validate_manifest,
                               write_json_atomic)
from exporter.parity import INPUTS_FILE, OUTPUTS_FILE, RUNNER_NAME, parity_feeds, write_parity_data
from exporter.sources import Source
from exporter.vae import decoded_shape, export_vae_decoder, load_vae

DENOISER_FILES = {"fp32": "denoiser.onnx", "fp16": "denoiser.fp16.onnx"}
VAE_FILE = "vae_decoder.onnx"
log = logging.getLogger(__name__)
FP16_COMPUTE = ("float16 weights and activations; float32 graph inputs/outputs, normalisation statistics, "
                "softmax, reductions and the timestep embedding")


@dataclass
class ExportOptions:
    opset: int = onnx_io.DEFAULT_OPSET
    dynamic_batch: bool = True
    batch_size: int = 2
    fp16: bool = False
    vae: str = "checkpoint"  # "checkpoint" (the source's own VAE, if any), "none", or a diffusers VAE directory


def check_out_dir(out: str | Path, force: bool) -> Path:
    """Refuse an existing non-empty directory (or a file) unless --force."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"--out {out} exists and is not empty; pass --force to replace it")
    return out


def _versions(opset: int) -> dict:
    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return {"dit_edge": version("dit-edge"), "torch": version("torch"), "onnx": version("onnx"),
            "onnxscript": version("onnxscript"), "onnxruntime": version("onnxruntime"),
            "polygraphy": version("polygraphy"), "diffusers": version("diffusers"), "opset": opset}


@contextlib.contextmanager
def _stage(what: str) -> Iterator[None]:
    """Announce a step and its time: a large export runs for minutes (udit_b ~40 s on 2 cores, XL longer)."""
    log.info("%s ...", what)
    start = time.perf_counter()
    yield
    log.info("%s: %.1f s", what, time.perf_counter() - start)


def _resolve_vae(source: Source, choice: str) -> tuple[object | None, float | None]:
    if choice == "none":
        return None, None
    if choice == "checkpoint":
        return source.vae, source.scaling_factor
    if source.pixel_space:
        raise ValueError(f"--vae {choice}: this model works in pixel space (its checkpoint has no VAE)")
    vae = load_vae(choice)
    return vae, float(vae.config.scaling_factor)


def _denoiser_entry(model, file: str, external: str | None, compute: str) -> dict:
    return {"file": file, "external_data": external, "inputs": onnx_io.io_specs(model.graph.input),
            "outputs": onnx_io.io_specs(model.graph.output), "compute": compute}


def _write(source: Source, staging: Path, options: ExportOptions) -> dict:
    vae, scaling_factor = _resolve_vae(source, options.vae)
    # parity references first: eager PyTorch before any tracing touches the model
    batch = 2 if options.dynamic_batch else options.batch_size
    feeds = parity_feeds(source.latent, source.num_classes, source.diffusion, batch)
    with _stage("parity references (PyTorch outputs)"):
        write_parity_data(source.model, feeds, staging)

    with _stage(f"denoiser {source.name}: torch.onnx export"):
        fp32_model = export_denoiser(source, options.opset, options.dynamic_batch, options.batch_size)
    ops = custom_op_counts(fp32_model)
    half = None
    if options.fp16:
        with _stage("denoiser: fp16 conversion"):
            half = fp16.convert_to_fp16(fp32_model)
    precisions = {}
    with _stage("denoiser: save and check"):
        external = onnx_io.save_model(fp32_model, staging / DENOISER_FILES["fp32"])
        onnx_io.check_model(staging / DENOISER_FILES["fp32"])
        precisions["fp32"] = _denoiser_entry(fp32_model, DENOISER_FILES["fp32"], external, "float32")
        del fp32_model
        if half is not None:
            external = onnx_io.save_model(half, staging / DENOISER_FILES["fp16"])
            onnx_io.check_model(staging / DENOISER_FILES["fp16"])
            precisions["fp16"] = _denoiser_entry(half, DENOISER_FILES["fp16"], external, FP16_COMPUTE)
            del half

    vae_entry = None
    if vae is not None:  # always a dynamic batch: the runtime decodes however many images it sampled
        with _stage("VAE decoder: export, save and check"):
            vae_entry = export_vae_decoder(vae, scaling_factor, source.latent, staging / VAE_FILE, options.opset)
    image = None
    if source.pixel_space:
        c, h, w = source.latent
        image = {"channels": c, "height": h, "width": w, "range": [-1, 1]}
    elif vae is not None:
        c, h, w = decoded_shape(vae, source.latent)
        image = {"channels": c, "height": h, "width": w, "range": [0, 1]}

    c = source.latent[0]
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "model": {"name": source.name, "config": source.config, "family": source.family,
                  "attention": source.attention, "reparameterized": True, "source": source.origin},
        "space": "pixel" if source.pixel_space else "latent",
        "latent": {"channels": c, "height": source.latent[1], "width": source.latent[2]},
        "image": image,
        "classes": {"num_classes": source.num_classes, "null_label": source.num_classes},
        "learn_sigma": source.learn_sigma,
        "output_channels": {"eps": [0, c], "variance": [c, 2 * c] if source.learn_sigma else None},
        "diffusion": source.diffusion,
        "scheduler": source.scheduler,
        "cfg": {"channels": source.cfg_channels},
        "denoiser": {"precisions": precisions, "batch": "dynamic" if options.dynamic_batch else options.batch_size},
        "vae_decoder": vae_entry,
        "custom_ops": [{"domain": dit_ops.DOMAIN, "name": name, "version": dit_ops.OPSET_VERSION, "count": n,
                        "plugin_namespace": dit_ops.PLUGIN_NAMESPACE, "plugin_version": dit_ops.PLUGIN_VERSION}
                       for name, n in sorted(ops.items())],
        "exporter": _versions(options.opset),
        "parity": {"inputs": INPUTS_FILE, "outputs": {p: OUTPUTS_FILE for p in precisions},
                   "runner": RUNNER_NAME, "tolerances": TOLERANCES},
    }
    files = hash_files(staging)
    manifest["files"] = files
    for entry in precisions.values():
        entry["sha256"] = files[entry["file"]]
    if vae_entry is not None:
        vae_entry["sha256"] = files[vae_entry["file"]]
    validate_manifest(manifest)
    write_json_atomic(staging / "manifest.json", manifest)
    return manifest


def export_package(source: Source, out: str | Path, options: ExportOptions | None = None,
                   force: bool = False) -> dict:
    """Write the package for `source` to `out` (replacing it only when `force`); returns the manifest."""
    options = options or ExportOptions()
    onnx_io.check_opset(options.opset)
    out = check_out_dir(out, force).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.staging-"))
    try:
        os.chmod(staging, default_mode(0o777))
        manifest = _write(source, staging, options)
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            out.rename(old / "package")
            staging.rename(out)
            shutil.rmtree(old)
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest
