"""Package manifest (schema 1): building, validating, hashing and atomic writes.

The manifest is the only thing the torch-free runtime reads besides the ONNX files, so the
validator here is strict and names every problem it finds at once. Layout: docs/architecture.md.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

# The runtime is torch-free, so the writer can share the reader's hashing.
from runtime.manifest import SCHEMA_VERSION, sha256_file

CUSTOM_OP_DOMAIN = "dit_ops"
CUSTOM_OP_NAMES = ("DownsampledAttention", "LocalWindowAttention")
PRECISIONS = ("fp32", "fp16", "int8", "fp8")
DTYPES = ("float32", "float16", "int64", "int32")
TOLERANCES = {"fp32": {"max_abs_error_over_scale": 1e-4}, "fp16": {"cosine_similarity": 0.999}}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def hash_files(package_dir: str | Path) -> dict[str, str]:
    """sha256 of every file in the package except the manifest itself, keyed by posix relative path."""
    root = Path(package_dir)
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


def default_mode(mode: int) -> int:
    """`mode` masked by the process umask (mkstemp / mkdtemp create private 0600 / 0700 entries)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON through a temporary file in the same directory, then rename over the target."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
        os.chmod(tmp, default_mode(0o666))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_manifest(package_dir: str | Path) -> dict:
    path = Path(package_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{package_dir} is not a dit-edge package: no manifest.json")
    with open(path) as f:
        return json.load(f)


def refresh_hashes(package_dir: str | Path, manifest: dict) -> dict:
    """Recompute `files` and every per-file sha256 field from what is on disk."""
    files = hash_files(package_dir)
    manifest["files"] = files
    for entry in manifest["denoiser"]["precisions"].values():
        entry["sha256"] = files[entry["file"]]
    if manifest.get("vae_decoder"):
        manifest["vae_decoder"]["sha256"] = files[manifest["vae_decoder"]["file"]]
    return manifest


def verify_files(package_dir: str | Path, manifest: dict) -> list[str]:
    """Files that are missing or whose sha256 differs from the manifest (empty list = intact)."""
    root = Path(package_dir)
    bad = []
    for rel, digest in manifest["files"].items():
        path = root / rel
        if not path.is_file():
            bad.append(f"{rel}: missing")
        elif sha256_file(path) != digest:
            bad.append(f"{rel}: sha256 mismatch")
    return bad


def _io_errors(where: str, specs: Any, errors: list[str]) -> None:
    if not isinstance(specs, list) or not specs:
        errors.append(f"{where}: must be a non-empty list of {{name, dtype, shape}}")
        return
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or not {"name", "dtype", "shape"} <= spec.keys():
            errors.append(f"{where}[{i}]: needs keys name, dtype, shape")
            continue
        if spec["dtype"] not in DTYPES:
            errors.append(f"{where}[{i}].dtype {spec['dtype']!r}: valid dtypes are {', '.join(DTYPES)}")
        shape = spec["shape"]
        if not isinstance(shape, list) or not all(
            (isinstance(d, int) and not isinstance(d, bool) and d > 0) or isinstance(d, str) for d in shape
        ):
            errors.append(f"{where}[{i}].shape {shape!r}: dims must be positive ints or symbolic names")


def _require(obj: Any, where: str, keys: dict[str, type | tuple], errors: list[str]) -> bool:
    if not isinstance(obj, dict):
        errors.append(f"{where}: must be an object")
        return False
    ok = True
    for key, typ in keys.items():
        if key not in obj:
            errors.append(f"{where}.{key}: missing")
            ok = False
        elif not isinstance(obj[key], typ) or (isinstance(obj[key], bool) and typ in (int, (int, float))):
            errors.append(f"{where}.{key}: expected {typ}, got {type(obj[key]).__name__}")
            ok = False
    return ok


def validate_manifest(manifest: dict) -> None:
    """Raise ValueError listing every schema-1 violation; return None when the manifest is valid."""
    errors: list[str] = []
    if not isinstance(manifest, dict):
        raise ValueError("manifest must be a JSON object")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        errors.append(f"schema_version {manifest.get('schema_version')!r}: this reader supports {SCHEMA_VERSION}")

    model = manifest.get("model")
    if _require(model, "model", {"name": str, "config": dict, "family": str, "attention": dict,
                                 "reparameterized": bool}, errors):
        if model["family"] not in ("dit", "udit"):
            errors.append(f"model.family {model['family']!r}: valid families are dit, udit")
        kind = model["attention"].get("kind")
        if kind not in ("full", "local"):
            errors.append(f"model.attention.kind {kind!r}: valid kinds are full, local")
        elif kind == "local" and not isinstance(model["attention"].get("radius"), (int, float)):
            errors.append("model.attention.radius: required for local attention")

    latent = manifest.get("latent")
    if _require(latent, "latent", {"channels": int, "height": int, "width": int}, errors):
        if min(latent["channels"], latent["height"], latent["width"]) <= 0:
            errors.append("latent: channels, height and width must be positive")

    image = manifest.get("image")
    if image is not None and _require(image, "image", {"channels": int, "height": int, "width": int,
                                                        "range": list}, errors):
        if len(image["range"]) != 2 or image["range"][0] >= image["range"][1]:
            errors.append(f"image.range {image['range']!r}: must be [low, high]")

    classes = manifest.get("classes")
    if _require(classes, "classes", {"num_classes": int, "null_label": int}, errors):
        if classes["num_classes"] <= 0 or classes["null_label"] != classes["num_classes"]:
            errors.append("classes: need num_classes > 0 and null_label == num_classes")
    if not isinstance(manifest.get("learn_sigma"), bool):
        errors.append("learn_sigma: must be a bool")

    diffusion = manifest.get("diffusion")
    if _require(diffusion, "diffusion", {"num_train_timesteps": int, "beta_start": (int, float),
                                         "beta_end": (int, float), "beta_schedule": str}, errors):
        if not 0 < diffusion["beta_start"] < diffusion["beta_end"] < 1:
            errors.append("diffusion: need 0 < beta_start < beta_end < 1")

    cfg = manifest.get("cfg")
    if _require(cfg, "cfg", {"channels": (int, str)}, errors):
        ch = cfg["channels"]
        n_latent = latent.get("channels", 0) if isinstance(latent, dict) else 0
        if not (ch == "all" or (isinstance(ch, int) and 0 < ch <= n_latent)):
            errors.append(f"cfg.channels {ch!r}: must be 'all' or an int in 1..latent.channels")

    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        errors.append("files: must map relative paths to sha256")
        files = {}
    for rel, digest in files.items():
        if rel.startswith("/") or ".." in Path(rel).parts:
            errors.append(f"files[{rel!r}]: must be a relative path inside the package")
        if not isinstance(digest, str) or not _SHA256.match(digest):
            errors.append(f"files[{rel!r}]: not a sha256 hex digest")

    def check_file_entry(entry: dict, where: str) -> None:
        if entry.get("file") not in files:
            errors.append(f"{where}.file {entry.get('file')!r}: not listed in files")
        elif entry.get("sha256") != files[entry["file"]]:
            errors.append(f"{where}.sha256: differs from files[{entry['file']!r}]")
        data = entry.get("external_data")
        if data is not None and data not in files:
            errors.append(f"{where}.external_data {data!r}: not listed in files")

    denoiser = manifest.get("denoiser")
    precisions = denoiser.get("precisions") if isinstance(denoiser, dict) else None
    if not isinstance(precisions, dict) or "fp32" not in precisions:
        errors.append("denoiser.precisions: must be an object holding at least fp32")
        precisions = {}
    for name, entry in precisions.items():
        where = f"denoiser.precisions.{name}"
        if name not in PRECISIONS:
            errors.append(f"{where}: unknown precision, valid ones are {', '.join(PRECISIONS)}")
        if not _require(entry, where, {"file": str, "sha256": str, "inputs": list, "outputs": list}, errors):
            continue
        check_file_entry(entry, where)
        _io_errors(f"{where}.inputs", entry["inputs"], errors)
        _io_errors(f"{where}.outputs", entry["outputs"], errors)
        names = [s.get("name") for s in entry["inputs"] if isinstance(s, dict)]
        if names != ["x", "t", "y"]:
            errors.append(f"{where}.inputs: names must be x, t, y in that order, got {names}")

    vae = manifest.get("vae_decoder")
    if vae is not None and _require(vae, "vae_decoder", {"file": str, "sha256": str, "input": str,
                                                         "output": str, "scaling_factor": (int, float),
                                                         "output_range": list}, errors):
        check_file_entry(vae, "vae_decoder")
        if image is None:
            errors.append("image: must describe the decoded image when vae_decoder is present")

    ops = manifest.get("custom_ops")
    if not isinstance(ops, list):
        errors.append("custom_ops: must be a list")
        ops = []
    for i, op in enumerate(ops):
        if _require(op, f"custom_ops[{i}]", {"domain": str, "name": str, "version": int, "count": int}, errors):
            if op["domain"] != CUSTOM_OP_DOMAIN or op["name"] not in CUSTOM_OP_NAMES:
                errors.append(f"custom_ops[{i}]: {op['domain']}::{op['name']} is not one of "
                              f"{', '.join(f'{CUSTOM_OP_DOMAIN}::{n}' for n in CUSTOM_OP_NAMES)}")

    _require(manifest.get("exporter"), "exporter", {"dit_edge": str, "torch": str, "onnx": str,
                                                    "onnxscript": str, "opset": int}, errors)

    parity = manifest.get("parity")
    if parity is not None and _require(parity, "parity", {"inputs": str, "outputs": dict,
                                                          "tolerances": dict}, errors):
        for rel in [parity["inputs"], *parity["outputs"].values()]:
            if rel not in files:
                errors.append(f"parity: {rel!r} not listed in files")

    if errors:
        raise ValueError("invalid manifest:\n  " + "\n  ".join(errors))
