"""Read and check a package directory's manifest.json (schema 1, docs/architecture.md).

Only what the runtime relies on is validated, with errors that name the offending key or file; the
sha256 of every listed file is verified before any of them is opened, so a truncated copy or an edited
weights file fails loudly instead of producing wrong images.
"""

import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import Any

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
REQUIRED_KEYS = (
    "schema_version", "model", "latent", "image", "classes", "learn_sigma",
    "diffusion", "cfg", "denoiser", "vae_decoder", "files",
)  # fmt: skip
DENOISER_INPUTS = ("x", "t", "y")
TIMESTEP_DTYPES = ("float32", "int64")
OUTPUT_RANGES = ([0, 1], [-1, 1])


class PackageError(ValueError):
    """A package directory that is missing, malformed or does not match its manifest."""


def load_manifest(package_dir: str | Path) -> dict[str, Any]:
    """Parse and validate `package_dir/manifest.json` (file hashes are checked by verify_files)."""
    package_dir = Path(package_dir)
    path = package_dir / MANIFEST_NAME
    if not package_dir.is_dir():
        raise PackageError(f"package directory {package_dir} does not exist")
    if not path.is_file():
        raise PackageError(f"{package_dir} is not a dit-edge package: {MANIFEST_NAME} is missing")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise PackageError(f"{path} is not valid JSON: {error}") from None
    validate_manifest(manifest)
    return manifest


def validate_manifest(manifest: Any) -> None:
    """Check schema version, required keys and the fields the sampler reads."""
    if not isinstance(manifest, dict):
        raise PackageError("manifest must be a JSON object")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise PackageError(
            f"manifest schema_version {version!r} is not supported: this runtime reads schema {SCHEMA_VERSION}"
        )
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise PackageError(f"manifest is missing required keys: {', '.join(missing)}")
    _check_shape(manifest["latent"], "latent")
    if manifest["image"] is not None:
        _check_shape(manifest["image"], "image")
    classes = _section(manifest, "classes")
    for key in ("num_classes", "null_label"):
        if not _is_int(classes.get(key)) or classes[key] < 0:
            raise PackageError(f"manifest classes.{key} must be a non-negative integer, got {classes.get(key)!r}")
    if not isinstance(manifest["learn_sigma"], bool):
        raise PackageError(f"manifest learn_sigma must be true or false, got {manifest['learn_sigma']!r}")
    _section(manifest, "diffusion")
    channels = _section(manifest, "cfg").get("channels")
    if channels != "all" and not (_is_int(channels) and channels >= 1):
        raise PackageError(f"manifest cfg.channels must be a positive integer or 'all', got {channels!r}")
    _check_denoiser(_section(manifest, "denoiser"))
    if manifest["vae_decoder"] is not None:
        _check_vae(_section(manifest, "vae_decoder"))
    files = manifest["files"]
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise PackageError("manifest files must map relative paths to sha256 hex digests")


def listed_files(manifest: dict[str, Any]) -> dict[str, str]:
    """Every file the manifest names with its sha256: `files` plus each model entry."""
    entries = [(path, digest) for path, digest in manifest["files"].items()]
    entries += [(e["file"], e["sha256"]) for e in manifest["denoiser"]["precisions"].values()]
    if manifest["vae_decoder"] is not None:
        entries.append((manifest["vae_decoder"]["file"], manifest["vae_decoder"]["sha256"]))
    listed: dict[str, str] = {}
    for path, digest in entries:
        if listed.setdefault(path, digest.lower()) != digest.lower():
            raise PackageError(f"manifest lists two different sha256 values for {path!r}")
    return listed


def verify_files(package_dir: str | Path, manifest: dict[str, Any]) -> None:
    """Hash every listed file; raise PackageError naming the first missing or altered one."""
    package_dir = Path(package_dir)
    for relative, expected in listed_files(manifest).items():
        path = resolve(package_dir, relative)
        if not path.is_file():
            raise PackageError(f"package file {relative!r} listed in the manifest is missing from {package_dir}")
        actual = sha256_file(path)
        if actual != expected:
            raise PackageError(
                f"package file {relative!r} failed its sha256 check (manifest {expected[:16]}..., "
                f"file {actual[:16]}...): it was modified or corrupted; re-export or re-copy the package"
            )


def resolve(package_dir: Path, relative: str) -> Path:
    """The absolute path of a manifest entry; entries must stay inside the package directory."""
    pure = PurePosixPath(relative)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts:
        raise PackageError(f"manifest path {relative!r} must be relative and inside the package directory")
    return package_dir.joinpath(*pure.parts)


def sha256_file(path: str | Path, chunk_size: int = 1 << 22) -> str:
    """sha256 read in chunks, so multi-GB external data files never sit in memory (the exporter uses it too)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _section(manifest: dict[str, Any], key: str) -> dict[str, Any]:
    if not isinstance(manifest[key], dict):
        raise PackageError(f"manifest {key} must be an object, got {manifest[key]!r}")
    return manifest[key]


def _check_shape(section: Any, name: str) -> None:
    if not isinstance(section, dict):
        raise PackageError(f"manifest {name} must be an object with channels, height, width")
    for key in ("channels", "height", "width"):
        if not _is_int(section.get(key)) or section[key] < 1:
            raise PackageError(f"manifest {name}.{key} must be a positive integer, got {section.get(key)!r}")


def _check_entry(entry: Any, where: str, keys: tuple[str, ...]) -> None:
    if not isinstance(entry, dict):
        raise PackageError(f"manifest {where} must be an object")
    missing = [key for key in keys if key not in entry]
    if missing:
        raise PackageError(f"manifest {where} is missing {', '.join(missing)}")


def _check_denoiser(denoiser: dict[str, Any]) -> None:
    precisions = denoiser.get("precisions")
    if not isinstance(precisions, dict) or not precisions:
        raise PackageError("manifest denoiser.precisions must name at least one precision (e.g. fp32)")
    for precision, entry in precisions.items():
        where = f"denoiser.precisions.{precision}"
        _check_entry(entry, where, ("file", "sha256", "inputs", "outputs"))
        inputs = {spec.get("name"): spec for spec in entry["inputs"] if isinstance(spec, dict)}
        if sorted(inputs) != sorted(DENOISER_INPUTS):
            names = ", ".join(DENOISER_INPUTS)
            raise PackageError(f"manifest {where}.inputs must be named {names}, got {list(inputs)}")
        if inputs["t"].get("dtype") not in TIMESTEP_DTYPES:
            raise PackageError(f"manifest {where} input t must have dtype in {TIMESTEP_DTYPES}")
        if not entry["outputs"] or not isinstance(entry["outputs"][0], dict) or "name" not in entry["outputs"][0]:
            raise PackageError(f"manifest {where}.outputs must list the output tensor by name")


def _check_vae(vae: dict[str, Any]) -> None:
    _check_entry(vae, "vae_decoder", ("file", "sha256", "input", "output"))
    if list(vae.get("output_range", [0, 1])) not in OUTPUT_RANGES:
        raise PackageError(f"manifest vae_decoder.output_range must be one of {OUTPUT_RANGES}")
